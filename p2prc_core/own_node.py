"""This node as peers see it: its specs (with which GPUs are free now), its signed record,
and ``server.json``, where the server that runs for this home says where it listens."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2prc_core import __version__
from p2prc_core.addresses import advertised_addresses
from p2prc_core.config import Settings
from p2prc_core.identity import NodeIdentity
from p2prc_core.plugins import PluginHooks
from p2prc_core.reach_state import ReachState, recently_reached
from p2prc_core.records import RecordPublisher, dated_ahead
from p2prc_core.storage import atomic_write, read_json_object

RECORD_SECONDS = 30.0  # how long a built record is served before it is built again
SERVER_FILE = "server.json"


class TimedCache:
    """Keep a value for ``ttl`` seconds. While one thread refreshes it, others get the old one."""

    def __init__(self, produce: Callable[[], Any], ttl: float):
        self._produce = produce
        self._ttl = ttl
        self._value: Any = None
        self._stamp = float("-inf")
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Produce the value again on the next ``get``."""
        self._stamp = float("-inf")

    def refresh(self) -> Any:
        """Produce the value now (waiting for a refresh under way), and keep it."""
        with self._lock:
            self._value = self._produce()
            self._stamp = time.monotonic()
            return self._value

    def get(self) -> Any:
        if time.monotonic() - self._stamp < self._ttl:
            return self._value
        if self._value is not None and not self._lock.acquire(blocking=False):
            return self._value  # someone else is refreshing: serve the old value
        if self._value is None:
            self._lock.acquire()
        try:
            if time.monotonic() - self._stamp >= self._ttl or self._value is None:
                self._value = self._produce()
                self._stamp = time.monotonic()
            return self._value
        finally:
            self._lock.release()


def advertised_with_mapping(settings: Settings, hooks: PluginHooks,
                            reach: dict[str, Any]) -> list[str]:
    """The addresses this node advertises, with the address its router maps for it (UPnP)
    first, unless the user set ``advertise_addresses``: the one rule for the record and for
    ``p2prc status``."""
    addresses = advertised_addresses(settings, hooks, recently_reached(reach))
    mapped = reach.get("upnp") if isinstance(reach.get("upnp"), dict) else {}
    external = mapped.get("external_ip") if mapped else None
    if isinstance(external, str) and not settings.advertise_addresses and \
            external not in addresses:
        addresses.insert(0, external)
    return addresses


def record_fields(settings: Settings, hooks: PluginHooks, specs: dict[str, Any],
                  version: str, reach: dict[str, Any] | None = None) -> dict[str, Any]:
    """What this node says about itself in its signed record (all but id, key, seq, time).
    ``reach`` is what the server learnt of how to reach it (``reach.ReachState``): the
    address its router maps for it, and the relay it waits at."""
    reach = reach or {}
    addresses = advertised_with_mapping(settings, hooks, reach)
    upnp = reach.get("upnp")
    external = upnp.get("external_ip") if isinstance(upnp, dict) else None
    # Which address is the router's mapping (metadata: a field of its own would make nodes
    # of an earlier version drop the record), so that a peer that reached it there can say
    # so ('peers ls': path "mapped").
    metadata = {"mapped": external} if isinstance(external, str) and \
        external in addresses[:16] else {}
    short = {"cpus": specs.get("cpu", {}).get("threads", 0),
             "memory": specs.get("memory", {}).get("total", 0),
             "gpus": [str(g.get("name", "")) for g in specs.get("gpus", [])][:8]}
    fields = {"name": settings.display_name[:64], "addresses": addresses[:16],
              "port": settings.advertise_port or settings.port, "specs": short,
              "metadata": metadata, "version": version}
    if isinstance(reach.get("relay"), str):
        fields["relays"] = [reach["relay"]]
    if settings.relay:
        fields["relay"] = True
    return fields


@dataclass(frozen=True)
class RunningServer:
    """The server that runs for this home, as ``server.json`` says: its process, and where it
    listens (``p2prc server --port N`` may differ from the settings)."""

    pid: int
    port: int
    host: str | None


class OwnNode:
    """This node's specs, record and ``server.json``. ``gpu_holders`` says which containers
    hold each GPU (the host's container store); a GPU nobody holds is free."""

    def __init__(self, settings: Settings, home: Path, hooks: PluginHooks,
                 identity: Callable[[], NodeIdentity],
                 gpu_holders: Callable[[], dict[int, list[str]]]):
        self.settings = settings
        self.home = home
        self.hooks = hooks
        self._identity = identity
        self.gpu_holders = gpu_holders
        self._specs = TimedCache(self._collect_specs, settings.specs_cache_seconds)
        self._record = TimedCache(self._build_record, RECORD_SECONDS)
        self.serving = False  # this process is the node's server (see announce_server)

    # -- specs ---------------------------------------------------------------------------------

    def _collect_specs(self) -> tuple[dict[str, Any], bytes]:
        specs = self.hooks.collect_specs()
        return specs, json.dumps(specs).encode()

    def specs(self) -> dict[str, Any]:
        """This machine's specs (cached for ``specs_cache_seconds``)."""
        result: dict[str, Any] = self._specs.get()[0]
        return result

    def specs_json(self) -> bytes:
        """The specs as the server answers them: each GPU says whether it is free now."""
        specs, cached = self._specs.get()
        if not self.gpus():
            return bytes(cached)
        return json.dumps(self.specs_now()).encode()

    def specs_now(self) -> dict[str, Any]:
        """The specs, each GPU with ``free`` (no container holds it, or ``gpu_share``)."""
        specs = dict(self.specs())
        held = self.gpu_holders()
        share = self.settings.gpu_share
        specs["gpus"] = [{**g, "free": share or not held.get(g.get("index", -1))}
                         if isinstance(g, dict) else g for g in self.gpus()]
        return specs

    def gpus(self) -> list[Any]:
        gpus = self.specs().get("gpus")
        return gpus if isinstance(gpus, list) else []

    def free_gpus(self) -> int:
        held = self.gpu_holders()
        return sum(1 for g in self.gpus() if isinstance(g, dict) and
                   (self.settings.gpu_share or not held.get(g.get("index", -1))))

    # -- server.json ---------------------------------------------------------------------------

    def running_server(self) -> RunningServer | None:
        """The server that runs for this home, if one does: a command run beside it learns
        its real port (``p2prc server --port N``) here."""
        try:
            found = read_json_object(self.home / SERVER_FILE)
            pid, port, host = found.get("pid"), found.get("port"), found.get("host")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or \
                    not isinstance(port, int) or not 0 < port < 65536:
                return None
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return RunningServer(pid, port, host if isinstance(host, str) else None)

    def announce_server(self) -> None:
        """Say, for commands run beside it, that this process serves this home, and where."""
        self.serving = True
        atomic_write(self.home / SERVER_FILE, json.dumps(
            {"pid": os.getpid(), "port": self.settings.port, "host": self.settings.host,
             "started": time.time()}).encode())

    def withdraw_server(self) -> None:
        running = self.running_server()
        if running is not None and running.pid == os.getpid():
            (self.home / SERVER_FILE).unlink(missing_ok=True)

    def publishes(self) -> bool:
        """Whether a server of this node runs (this process, or one beside it): only then is
        this node handed to peers as one to dial."""
        return self.serving or self.running_server() is not None

    @property
    def served_settings(self) -> Settings:
        """The settings, with the port of the server that runs for this home (the one that
        peers must dial), when this process is not that server."""
        running = None if self.serving else self.running_server()
        if running is None or (running.port, running.host) == \
                (self.settings.port, self.settings.host):
            return self.settings
        return dataclasses.replace(self.settings, port=running.port,
                                   host=running.host if running.host is not None
                                   else self.settings.host)

    # -- the signed record ---------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int | None]:
        """What the record depends on besides time: how others reach this node (the mtime
        of ``reach.json``) and how many GPUs are free."""
        return ReachState(self.home).stamp(), self.free_gpus() if self.gpus() else None

    def _build_record(self) -> tuple[tuple[int, int | None], dict[str, Any]]:
        stamp = self._stamp()  # taken before what it stands for is read
        fields = record_fields(self.served_settings, self.hooks, self.specs(), __version__,
                               ReachState(self.home).read())
        if stamp[1] is not None:  # this machine has GPUs: how many are free, as stamped
            fields["specs"]["gpus_free"] = stamp[1]
        return stamp, RecordPublisher(self.home, self._identity()).current(fields)

    def record(self) -> dict[str, Any]:
        """This node's signed record, as its server serves it (built again at once when
        the server learnt a new way to reach it, a relay or a mapped port, and when a GPU
        was taken or freed: a record built from what was true before is never served
        after), and when this clock went back since it was signed (``dated_ahead``)."""
        built, record = self._record.get()
        if built != self._stamp() or dated_ahead(record, time.time()):
            built, record = self._record.refresh()
        return record
