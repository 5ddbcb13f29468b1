"""One node's services, built in one place: the server and the command line both use
``NodeServices``, so nothing about a node (its record, table, discovery, containers, runs,
trust) is put together twice."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2prc_core import __version__
from p2prc_core.config import Settings, parse_port_range
from p2prc_core.containers import Backend, ContainerError, ContainerService, ContainerStore
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.intake import IntakeLimit, source_prefix
from p2prc_core.models import Address, Endpoint, looks_like_address, parse_endpoint, pin_key
from p2prc_core.node import TimedCache, advertised_addresses, dial_endpoints, record_fields
from p2prc_core.peertable import PeerEntry, PeerTable
from p2prc_core.plugins import PluginHooks
from p2prc_core.records import RecordPublisher
from p2prc_core.sshkeys import ensure_key
from p2prc_core.tasks import Playbooks, Runs, RunService
from p2prc_core.text import format_when
from p2prc_core.tls import NodeMismatch
from p2prc_core.tracking import RemoteContainer, Tracked
from p2prc_core.trust import Invite, ServerState, TrustError, TrustStore, accept_invite

if TYPE_CHECKING:  # httpx and what uses it load only where a node talks to peers
    from p2prc_core.client import PeerClient, Transfer
    from p2prc_core.discovery import Discovery, UpdateSummary

log = logging.getLogger("p2prc")

RECORD_SECONDS = 30.0  # how long a built record is served before it is built again


def _whole(value: Any) -> int | None:
    """A count or size a peer's record gives: a whole number from 0, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


class NodeServices:
    """This node's objects, each built on first use from its settings, home and plugins."""

    def __init__(self, settings: Settings, home: Path, hooks: PluginHooks,
                 notice: Callable[[str], None] | None = None):
        self.settings = settings
        self.home = home
        self.hooks = hooks
        self.notice = notice or log.info  # what a user should see (the CLI prints it)
        self.started = time.monotonic()
        self._specs = TimedCache(self._collect_specs, settings.specs_cache_seconds)
        self._record = TimedCache(self._build_record, RECORD_SECONDS)
        self._reach_stamp: object = None
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # as 'p2prc init' makes it
        self.serving = False  # this process is the node's server (see announce_server)
        self._containers: ContainerService | None = None
        self._containers_lock = threading.Lock()  # gunicorn's threads build it once

    # -- who this node is ----------------------------------------------------------------------

    @cached_property
    def identity(self) -> NodeIdentity:
        """This node's key, created on first use."""
        return NodeIdentity.load_or_create(self.home)

    @cached_property
    def trust(self) -> TrustStore:
        return TrustStore(self.home)

    @cached_property
    def state(self) -> ServerState:
        """Nonces and invites, shared by every worker and the CLI."""
        return ServerState(self.home)

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

    def gpu_holders(self) -> dict[int, list[str]]:
        """Which containers (or creates under way) hold each held GPU of this host's."""
        if not (self.home / "server.db").exists():
            return {}  # this node never ran a container
        return self.container_store.gpu_holders()

    def free_gpus(self) -> int:
        held = self.gpu_holders()
        return sum(1 for g in self.gpus() if isinstance(g, dict) and
                   (self.settings.gpu_share or not held.get(g.get("index", -1))))

    @cached_property
    def container_store(self) -> ContainerStore:
        return ContainerStore(self.home, parse_port_range(self.settings.port_range))

    SERVER_FILE = "server.json"

    def running_server(self) -> dict[str, Any] | None:
        """The server that runs for this home (``{"pid", "port", "host"}``), if one does: a
        command run beside it learns its real port (``p2prc server --port N``) here."""
        from p2prc_core.storage import read_json_object

        try:
            found = read_json_object(self.home / self.SERVER_FILE)
            pid, port = found.get("pid"), found.get("port")
            if not isinstance(pid, int) or not isinstance(port, int) or not 0 < port < 65536:
                return None
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return found

    def announce_server(self) -> None:
        """Say, for commands run beside it, that this process serves this home, and where."""
        from p2prc_core.storage import atomic_write

        self.serving = True
        atomic_write(self.home / self.SERVER_FILE, json.dumps(
            {"pid": os.getpid(), "port": self.settings.port, "host": self.settings.host,
             "started": time.time()}).encode())

    def withdraw_server(self) -> None:
        running = self.running_server()
        if running is not None and running.get("pid") == os.getpid():
            (self.home / self.SERVER_FILE).unlink(missing_ok=True)

    @property
    def served_settings(self) -> Settings:
        """The settings, with the port of the server that runs for this home (the one that
        peers must dial), when this process is not that server."""
        running = None if self.serving else self.running_server()
        if running is None or (running["port"], running.get("host")) == \
                (self.settings.port, self.settings.host):
            return self.settings
        host = running.get("host")
        return dataclasses.replace(self.settings, port=running["port"],
                                   host=host if isinstance(host, str) else self.settings.host)

    def _build_record(self) -> dict[str, Any]:
        from p2prc_core.reach import ReachState

        fields = record_fields(self.served_settings, self.hooks, self.specs(), __version__,
                               ReachState(self.home).read())
        if self.gpus():
            fields["specs"]["gpus_free"] = self.free_gpus()
        return RecordPublisher(self.home, self.identity).current(fields)

    def own_record(self) -> dict[str, Any]:
        """This node's signed record, as its server serves it (built again at once when
        the server learnt a new way to reach it, a relay or a mapped port, and when a GPU
        was taken or freed)."""
        from p2prc_core.reach import ReachState

        stamp = (ReachState(self.home).stamp(), self.free_gpus() if self.gpus() else None)
        if stamp != self._reach_stamp:
            self._reach_stamp = stamp
            self._record.clear()
        record: dict[str, Any] = self._record.get()
        return record

    # -- peers ---------------------------------------------------------------------------------

    @cached_property
    def table(self) -> PeerTable:
        s = self.settings
        return PeerTable(self.home, self.identity.node_id, s.allow_loopback, s.max_table_peers,
                         s.max_unverified_peers)

    def peer_rows(self, with_gpu: bool = False) -> list[dict[str, Any]]:
        """The table as ``peers ls`` shows it, best first (by ``p2prc_score_peer``): each
        peer's names, the path that answered last, latency, bandwidth, when last seen, GPUs
        (and how many its record says are free), memory and CPUs its record gives, and the
        name it is trusted under (None: not trusted). ``with_gpu``: only peers with a free
        GPU. Whatever a record says is checked for its type here."""
        entries = self.table.load()
        trusted = {k: v.get("name") or k[:8] for k, v in self.trust.all().items()}
        peers = (e.to_peer() for e in entries.values())
        ranked = self.hooks.rank_peers(p for p in peers if not with_gpu or p.free_gpus > 0)
        rows: list[dict[str, Any]] = []
        for peer in ranked:
            entry = entries[peer.node_id]
            measured = entry.measured
            endpoints = [] if measured.address else self.discovery.endpoints(entry)
            address = measured.address or (endpoints[0].path if endpoints else "-")
            specs = entry.record.get("specs")
            specs = specs if isinstance(specs, dict) else {}
            gpus = specs.get("gpus")
            rows.append({"name": entry.local_name or peer.name, "node_id": peer.node_id,
                         "own_name": peer.name, "address": address,
                         "path": "relay" if address.startswith("relay ") else
                         "direct" if measured.address else "-",
                         "relays": [r.node_id for r in self.table.relays(entry.record)],
                         "latency_ms": measured.latency_ms,
                         "bandwidth_mbps": measured.bandwidth_mbps,
                         "last_seen": measured.last_seen, "failures": measured.failures,
                         "gpus": [g for g in gpus if isinstance(g, str)][:8]
                         if isinstance(gpus, list) else [],
                         "gpus_free": peer.free_gpus,
                         "memory": _whole(specs.get("memory")),
                         "cpus": _whole(specs.get("cpus")),
                         "trusted": trusted.get(peer.node_id),
                         "score": round(self.hooks.score_peer(peer), 3)})
        return rows

    @cached_property
    def discovery(self) -> Discovery:
        from p2prc_core.discovery import Discovery, HttpTransport

        s = self.settings
        discovery = Discovery(self.table, self.hooks,
                              HttpTransport(s.request_timeout, s.max_table_bytes, self.secure,
                                            self.identity),
                              self.own_record,
                              concurrency=s.update_concurrency, probes=s.latency_probes,
                              max_failures=s.peer_max_failures,
                              max_records=s.max_records_per_response,
                              newcomers_per_peer=s.exchange_newcomers_per_minute,
                              peer_budget=s.peer_time_budget)
        # A node whose server does not run is not handed to peers as one to dial.
        discovery.publish = lambda: self.serving or self.running_server() is not None
        return discovery

    def find_peer(self, text: str) -> PeerEntry | None:
        """A table entry for PEER; None when nothing in the table matches. In order: text
        that reads as an address is an address, never a name; a node id; a name the user
        gave (``peers add --name``); a unique prefix of a node id (4+ characters); a name a
        peer chose itself, when only one peer has it.

        :raises P2PRCError: the prefix or the name fits several peers.
        """
        if looks_like_address(text) or not self.table.path.exists():
            return None
        peers = self.table.load()
        if text in peers:
            return peers[text]
        mine = [e for e in peers.values() if e.local_name == text]  # the user's names first
        if mine:
            return mine[0]
        lowered = text.lower()
        if len(lowered) >= 4 and lowered.isalnum():
            by_prefix = [e for node_id, e in peers.items() if node_id.startswith(lowered)]
            if len(by_prefix) == 1:
                return by_prefix[0]
            if len(by_prefix) > 1:
                raise P2PRCError(f"{text!r} is the start of {len(by_prefix)} node ids: give "
                                 f"more of it")
        named = [e for e in peers.values() if e.name == text]
        if len(named) > 1:
            ids = ", ".join(e.node_id for e in named)
            raise P2PRCError(f"{len(named)} peers are named {text!r} ({ids}): use a node "
                             f"id, or name one yourself with 'p2prc peers add ADDRESS "
                             f"--name NAME'")
        if named:
            return named[0]
        return None

    def _peer_names(self) -> list[str]:
        """Every name the table knows: the user's own, and the ones peers gave themselves."""
        if not self.table.path.exists():
            return []
        return [name for e in self.table.load().values() for name in (e.local_name, e.name)
                if name]

    def _unknown_peer(self, text: str) -> str:
        from p2prc_core.text import did_you_mean

        return (f"no peer is named {text!r}{did_you_mean(text, self._peer_names())}: "
                f"'p2prc peers ls' lists them (a node id, or a unique start of one, works "
                f"too)")

    def node_id_of(self, text: str) -> str:
        """NODE as a node id: a node id; a name given on this node (to a trusted node, or
        to a peer with 'peers add --name'); a peer's own name; a unique prefix of a trusted
        node's or a peer's id (4+ characters).

        :raises P2PRCError: nothing fits (with the nearest name), or several do.
        """
        from p2prc_core.identity import is_node_id
        from p2prc_core.text import did_you_mean

        text = text.strip()
        lowered = text.lower()
        if is_node_id(lowered):
            return lowered
        trusted = self.trust.all()
        named = [node_id for node_id, v in trusted.items() if v.get("name") == text]
        if len(named) == 1:
            return named[0]
        entry = self.find_peer(text)
        if entry is not None:
            return entry.node_id
        if len(lowered) >= 4 and lowered.isalnum():
            found = [node_id for node_id in trusted if node_id.startswith(lowered)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise P2PRCError(f"{text!r} is the start of {len(found)} node ids: give "
                                 f"more of it")
        names = [str(v.get("name") or "") for v in trusted.values()] + self._peer_names()
        raise P2PRCError(f"no node is known as {text!r}{did_you_mean(text, names)}: give "
                         f"its node id, or a name from 'p2prc trust' or 'p2prc peers ls'")

    @property
    def secure(self) -> bool:
        """TLS between peers (``transport = "tls"``, the default)."""
        return self.settings.transport == "tls"

    def resolve(self, peer: str | Endpoint) -> list[Endpoint]:
        """PEER (a node id or a name from the table, NODE_ID@ADDRESS[:PORT], or
        ADDRESS[:PORT]) to where to dial it, each endpoint with the node id expected there:
        a peer from the table at its addresses in dial order; a bare address with the node
        pinned there, if one is (none on first contact).

        :raises ValueError: ``peer`` is neither in the table nor an address.
        :raises PeerError: the table has no address of the peer this node may dial.
        """
        if isinstance(peer, Endpoint):
            endpoint = peer
        else:
            entry = self.find_peer(peer)
            if entry is not None:
                endpoints = self.discovery.endpoints(entry)
                if not endpoints:
                    raise PeerError(f"{peer}: the table has no address this node may dial")
                return endpoints
            if _bare_word(peer):  # no peer is called that, and it is no host name either
                raise P2PRCError(self._unknown_peer(peer))
            endpoint = parse_endpoint(peer)
        if endpoint.node_id is None:
            endpoint = endpoint.expecting(self.pinned(endpoint))
        return [endpoint]

    def pinned(self, endpoint: Endpoint, *also: str) -> str | None:
        """The node id this node has seen answer at ``endpoint`` (trust on first use), by
        its one spelling (``pin_key``), or at any of the ``also`` pin keys."""
        if not self.table.path.exists():
            return None
        state = self.table.snapshot()
        for key in (endpoint.pin_key, *also):
            if key in state.pins:
                return state.pins[key]
        found = {e.node_id for e in state.peers.values()
                 if e.measured.address and e.measured.address in (endpoint.path, *also)}
        return found.pop() if len(found) == 1 else None

    def _contact(self, endpoint: Endpoint, presented: str, peer_ip: str | None,
                 pin: bool = True) -> None:
        """A TLS channel opened. On first contact at ``endpoint`` (however its address was
        written, and whatever name it was dialled by), refuse a node other than the one
        pinned at the IP address actually reached; otherwise pin the node that answered and
        say so. Pins change only there, or where the user named the node (NODE_ID@, an
        invite); a peer reached through the table never moves another node's pin.
        ``pin=False``: check the same, pin nothing (a read).

        :raises NodeMismatch: another node is pinned at the address reached.
        """
        if endpoint.node_id is not None and not endpoint.named:
            return
        keys = [endpoint.pin_key]
        if peer_ip is not None:
            keys.append(pin_key(peer_ip, endpoint.port))
        pinned = self.pinned(endpoint, *keys[1:])
        if endpoint.node_id is None and pinned is not None and pinned != presented:
            raise NodeMismatch(endpoint, pinned, presented)
        if not pin or pinned == presented or presented == self.identity.node_id:
            return
        self.table.pin(list(dict.fromkeys(keys)), presented)
        if endpoint.node_id is None:
            self.notice(f"first contact with {endpoint}: node {presented} (pinned: another "
                        f"key there will be refused)")
        elif pinned is not None:
            self.notice(f"{endpoint} is now pinned to node {presented} (was {pinned})")

    def client(self, peer: str | Endpoint | list[Endpoint], pin: bool = True) -> PeerClient:
        """A client for PEER (or for the paths given) over a checked channel, signing with
        this node's key. ``pin=False`` for a read that must change nothing (the dashboard's
        pages): a node other than the one pinned is refused all the same, and a first
        contact pins nothing."""
        from p2prc_core.client import PeerClient

        paths = peer if isinstance(peer, list) else self.resolve(peer)
        contact = partial(self._contact, pin=pin)
        return PeerClient(paths, timeout=self.settings.request_timeout,
                          identity=self.identity, secure=self.secure,
                          on_contact=contact if self.secure else None)

    def fetch_record(self, endpoint: Endpoint) -> dict[str, Any]:
        """The verified record of the node at ``endpoint``."""
        with self.client(endpoint) as client:
            return client.node()

    def add_peer(self, peer: str | Endpoint,
                 local_name: str | None = None) -> tuple[PeerEntry, UpdateSummary, Endpoint]:
        """Add the node at ``peer`` (ADDRESS[:PORT], or NODE_ID@ADDRESS[:PORT]) to the
        table, exchange tables with it and measure it; returns its entry, what the exchange
        brought, and the endpoint it was added at. ``local_name`` is the user's own name for
        it (taken from any peer that had it).

        :raises P2PRCError: it is this node, or it cannot be reached.
        """
        with self.client(peer) as client:
            record = client.node()
            endpoint = client.endpoint
        if record["node_id"] == self.identity.node_id:
            raise P2PRCError(f"{endpoint} is this node itself")
        summary = self.discovery.add(endpoint, record)
        if local_name:
            self.table.name(record["node_id"], local_name)
        return self.table.load()[record["node_id"]], summary, endpoint

    def speedtest(self, peer: str, size: int, download_only: bool = False,
                  progress: Callable[[str, int], Callable[[int], None]] | None = None
                  ) -> tuple[Endpoint, list[Transfer]]:
        """Download (and upload) ``size`` bytes to PEER; a peer from the table remembers
        the download's bandwidth. ``progress(direction, total)`` returns what to call with
        each count of bytes moved."""
        results: list[Transfer] = []
        with self.client(peer) as client:
            steps = [("download", client.download)]
            if not download_only:
                steps.append(("upload", client.upload))
            for direction, move in steps:
                advance = progress(direction, size) if progress else None
                results.append(move(size, advance))
            endpoint = client.endpoint
        entry = self.find_peer(peer)
        if entry is not None:
            self.table.record_bandwidth(entry.node_id, results[0].mbit_per_second)
        return endpoint, results

    def bootstrap(self) -> None:
        """Add the configured ``bootstrap`` peers the table does not hold yet."""
        self.discovery.bootstrap(self.settings.bootstrap, self.fetch_record)

    @cached_property
    def intake(self) -> IntakeLimit:
        return IntakeLimit(self.home, self.settings.exchange_newcomers_per_minute)

    def exchange(self, body: Any, source: str | None = None) -> dict[str, Any]:
        """The server's side of a table exchange (``discovery.handle_exchange``); the new
        peers a caller hands over count against its source's allowance."""
        from p2prc_core.discovery import handle_exchange

        prefix = source_prefix(source)
        try:
            observed = str(Address.parse(source)) if source else None
        except ValueError:
            observed = None
        return handle_exchange(self.table, self.own_record(), body,
                               self.settings.max_records_per_response,
                               admit=lambda wanted: self.intake.admit(prefix, wanted),
                               observed=observed)

    def table_etag(self) -> str:
        return f"{self.table.snapshot().cursor()}:{self.own_record()['seq']}"

    def status(self) -> dict[str, Any]:
        """This node at a glance (``doctor.node_status``)."""
        from p2prc_core.doctor import node_status

        return node_status(self)

    # -- trust ---------------------------------------------------------------------------------

    def accept_invite(self, caller: str, secret: str, caller_record: Any) -> dict[str, Any]:
        """The host's side of ``p2prc join``: the caller is trusted from now on."""
        accept_invite(self.state, self.trust, self.table, caller, secret, caller_record)
        return {"trusted": True, "node": self.own_record()}

    def create_invite(self, ttl: int, addresses: list[str] | None = None,
                      port: int | None = None) -> Invite:
        """A one-time invite to this node, naming its id, where to dial it (``addresses``,
        or what it advertises) and its port.

        :raises ValueError: an address is not an IP address.
        :raises TrustError: there is no address a friend could dial.
        """
        chosen = [str(Address.parse(a)) for a in addresses] if addresses else \
            advertised_addresses(self.settings, self.hooks)
        if not chosen:
            raise TrustError("this node has no address a friend could dial: pass --address")
        secret, expires = self.state.create_invite(ttl)
        served = self.served_settings
        return Invite(self.identity.node_id, chosen[:8],
                      port or served.advertise_port or served.port, secret, expires)

    def join(self, token: str) -> tuple[dict[str, Any], Endpoint]:
        """Redeem a friend's invite at the first of its addresses that answers: we are
        trusted there, and its node joins our table. Returns its record and where it was.

        :raises TrustError: the token is damaged or expired, or another node answered.
        :raises PeerError: no address of the inviting node answered.
        """
        offer = Invite.parse(token)
        if offer.expires < time.time():
            raise TrustError(f"this invite expired at {format_when(offer.expires)}: ask for a "
                             f"new one")
        candidates = []
        for text in offer.addresses:
            try:
                candidates.append(Address.parse(text))
            except ValueError:
                continue
        failures = []
        # Our record goes along only when a server of ours runs: else the host would keep
        # dialling an address where nothing answers.
        own = self.own_record() if self.serving or self.running_server() else None
        # The token names the node: only it can answer (TLS), whoever else has the address.
        for endpoint in dial_endpoints(self.hooks, candidates, offer.port,
                                       node_id=offer.node_id):
            endpoint = endpoint.expecting(offer.node_id, named=True)  # pinned on success
            try:
                with self.client(endpoint) as client:
                    record = client.join(offer.secret, own)
            except PeerRefused:
                raise
            except NodeMismatch as err:
                raise TrustError(f"{endpoint} is not the node the invite names "
                                 f"({err.presented} instead of {offer.node_id}): not "
                                 f"joined") from None
            except PeerError as err:
                failures.append(str(err))
                continue
            if record["node_id"] != offer.node_id:
                raise TrustError(f"{endpoint} is not the node the invite names "
                                 f"({record['node_id']} instead of {offer.node_id}): not joined")
            self.discovery.add(endpoint, record)
            return record, endpoint
        raise PeerError("could not reach the inviting node at any of its addresses: "
                        + "; ".join(failures))

    # -- containers and runs -------------------------------------------------------------------

    @cached_property
    def backends(self) -> dict[str, Backend]:
        return self.hooks.backends()

    def backend(self) -> Backend:
        """The configured virtualization backend.

        :raises ContainerError: 503 when it is not installed or was disabled.
        """
        backend = self.backends.get(self.settings.backend)
        if backend is None:
            raise ContainerError(503, "No backend",
                                 f"The {self.settings.backend!r} backend is not installed or "
                                 f"was disabled: this host runs no containers.")
        return backend

    def containers(self) -> ContainerService:
        """The host's container service over the configured backend (built on first use)."""
        with self._containers_lock:
            if self._containers is None:
                self._containers = ContainerService(
                    self.settings, self.backend(), self.container_store,
                    self.identity.node_id, self.gpus)
            return self._containers

    def reap(self) -> list[str]:
        """Remove the containers whose lease ran out; none when there is no engine."""
        try:
            return self.containers().reap()
        except ContainerError:
            return []

    def ssh_key(self) -> tuple[Path, str]:
        """The client's SSH key: the private key's path and the public key line."""
        return ensure_key(self.home, self.settings.ssh_key)

    def touch(self, peer: str, request: dict[str, Any]) -> RemoteContainer:
        """Start a container on PEER with our SSH key (``request`` holds what else was asked:
        ports, gpu, image, cpus, memory, ttl) and keep it as tracked."""
        _, public_key = self.ssh_key()
        with self.client(peer) as client:
            container = client.create_container({"ssh_key": public_key, **request})
        self.tracked.add(container)
        return container

    def container_states(self) -> list[tuple[RemoteContainer, str]]:
        """Each tracked container and its state as its host tells (``unreachable`` when the
        host cannot be asked, ``gone`` when it no longer runs it)."""
        by_host: dict[str, list[RemoteContainer]] = {}
        for container in self.tracked.containers().values():
            by_host.setdefault(container.endpoint, []).append(container)
        found = []
        for _, members in sorted(by_host.items()):
            try:
                with self.client(self.paths_to(members[0])) as client:
                    live: dict[str, str] | None = {c["id"]: c["state"]
                                                   for c in client.list_containers()}
            except PeerError:
                live = None
            for container in members:
                state = "unreachable" if live is None else live.get(container.id, "gone")
                if state == "gone" and container.expires <= time.time():
                    state = "expired"  # its lease ran out and the host removed it
                found.append((container, state))
        return found

    def remove_container(self, container: RemoteContainer) -> bool:
        """Remove a container from its host and forget it; False if the host had removed it
        already."""
        with self.client(self.paths_to(container)) as client:
            try:
                client.remove_container(container.id)
                removed = True
            except PeerRefused as err:
                if err.status != 404:
                    raise
                removed = False
        self.tracked.forget(container.id)
        (self.home / "ssh" / f"known_hosts_{container.short_id}").unlink(missing_ok=True)
        return removed

    def paths_to(self, container: RemoteContainer) -> list[Endpoint]:
        """Every way to reach a container's host: where it was started, then the host's dial
        ladder from the table (its addresses now, and its relays)."""
        paths = [container.host_endpoint]
        entry = self.table.load().get(container.node_id or "") if self.table.path.exists() \
            else None
        if entry is not None:
            paths += [e for e in self.discovery.endpoints(entry) if e not in paths]
        return paths

    def tunnel_stdio(self, container: RemoteContainer, port: int) -> None:
        """Join standard input and output to ``port`` of the container, through its host's
        p2prc port (OpenSSH's ProxyCommand)."""
        import asyncio

        from p2prc_core import tunnel

        asyncio.run(tunnel.stdio(self.paths_to(container), self.identity,
                                 f"/v1/containers/{container.id}/tunnel", f"port={port}",
                                 self.settings.request_timeout, self.secure))

    def forward(self, container: RemoteContainer, port: int, local_port: int,
                ready: Callable[[int], None],
                failed: Callable[[str], None] | None = None,
                stop: threading.Event | None = None) -> None:
        """Serve 127.0.0.1:``local_port`` as ``port`` of the container until interrupted, or
        until ``stop`` is set (from another thread)."""
        import asyncio

        from p2prc_core import tunnel

        if port not in [p["internal"] for p in container.ports]:
            raise P2PRCError(f"{container.short_id} has ports "
                             f"{', '.join(str(p['internal']) for p in container.ports)}, "
                             f"not {port}")

        async def serve() -> None:
            stopped = None
            if stop is not None:
                stopped, loop = asyncio.Event(), asyncio.get_running_loop()

                def relay_stop() -> None:
                    stop.wait()
                    with contextlib.suppress(RuntimeError):  # the loop ended first
                        loop.call_soon_threadsafe(stopped.set)

                threading.Thread(target=relay_stop, daemon=True).start()
            await tunnel.forward(self.paths_to(container), self.identity,
                                 f"/v1/containers/{container.id}/tunnel", f"port={port}",
                                 self.settings.request_timeout, self.secure, local_port,
                                 ready, stop=stopped, failed=failed)

        asyncio.run(serve())

    def check_alive(self, containers: list[RemoteContainer]) -> None:
        """Ask each host whether our containers there still run, before anything logs in:
        a port the host gave to someone else since must not be mistaken for ours.

        :raises P2PRCError: ``CONTAINER is gone``, or its host cannot be asked.
        """
        by_host: dict[str, list[RemoteContainer]] = {}
        for container in containers:
            by_host.setdefault(container.endpoint, []).append(container)
        for members in by_host.values():
            with self.client(self.paths_to(members[0])) as client:
                live = {c.get("id"): c.get("state") for c in client.list_containers()
                        if isinstance(c, dict)}
            for container in members:
                if container.id not in live:
                    raise P2PRCError(f"{container.short_id} is gone from "
                                     f"{container.endpoint} (removed by its host, or its "
                                     f"lease ran out): 'p2prc rm {container.short_id}' forgets "
                                     f"it")
                if live[container.id] != "running":
                    raise P2PRCError(f"{container.short_id} on {container.endpoint} is "
                                     f"{live[container.id]}, not running")

    @cached_property
    def tracked(self) -> Tracked:
        """Containers this client started, and groups."""
        return Tracked(self.home)

    @cached_property
    def playbooks(self) -> Playbooks:
        return Playbooks(self.home)

    @cached_property
    def runs(self) -> RunService:
        from p2prc_core.tunnel import helper_command as tunnel_command

        return RunService(self.playbooks, self.tracked, Runs(self.home), self.hooks.runners,
                          lambda: self.ssh_key()[0], self.check_alive,
                          lambda c: tunnel_command(self.home, c.id, 22, self.paths_to(c),
                                                   self.settings.request_timeout,
                                                   self.secure))


def _bare_word(text: str) -> bool:
    """A single word that is not an address: a peer's name, not a host to look up (a host
    name to dial has a dot, or is localhost; an address has digits and dots or colons)."""
    return bool(text.strip()) and not looks_like_address(text)
