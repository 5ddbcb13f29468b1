"""Settings: defaults < ``$P2PRC_HOME/config.toml`` < ``P2PRC_*`` environment < CLI flags."""

from __future__ import annotations

import difflib
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2prc_core.models import DEFAULT_PORT, Address, parse_duration, parse_endpoint, parse_size

ENV_PREFIX = "P2PRC_"
# P2PRC_ variables that are not settings, yet mean something
NOT_SETTINGS = {"P2PRC_HOME", "P2PRC_REQUIRE_INTEGRATION"}
CONFIG_FILE = "config.toml"


class ConfigError(Exception):
    """An invalid setting; the message names where it came from, the key and the problem."""


def _setting(default: Any, doc: str, **limits: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **limits})
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass
class Settings:
    """Every setting of a node. Field docs are what ``p2prc init`` writes as comments."""

    name: str = _setting("", "the name this node shows to others (default: the host name)")
    host: str = _setting("::", "address the server listens on; '::' is IPv6 and IPv4 at once")
    port: int = _setting(DEFAULT_PORT, "TCP port of the peer server", min=1, max=65535)
    workers: int = _setting(2, "gunicorn worker processes", min=1, max=64)
    threads: int = _setting(8, "threads per worker (two are kept for ordinary requests: "
                            "tunnels into containers take the rest; a relay has threads of "
                            "its own on top)", min=3, max=256)
    timeout: int = _setting(60, "seconds a request may take before its worker is restarted",
                            min=1, max=3600)
    request_head_seconds: float = _setting(10.0, "seconds a connection has to send a request "
                                           "head (TLS handshake included) and a small body",
                                           min=1)
    connections_per_source: int = _setting(32, "connections one address (an IPv6 /64) may "
                                           "hold to each worker at once (loopback: no limit)",
                                           min=1)
    log_level: str = _setting("info", "one of debug, info, warning, error",
                              choices=("debug", "info", "warning", "error"))
    access_log: bool = _setting(True, "log one line per request")
    max_body_bytes: int = _setting(1 << 20, "largest JSON request body accepted", min=1,
                                   unit="size")
    speedtest_default_bytes: int = _setting(50 << 20, "bytes a speed test sends by default",
                                            min=1, unit="size")
    speedtest_max_bytes: int = _setting(1 << 30, "largest speed-test download or upload",
                                        min=1, unit="size")
    specs_cache_seconds: float = _setting(2.0, "how long collected specs are reused", min=0)
    allow_loopback: bool = _setting(False, "advertise and accept loopback addresses (labs, tests)")
    disable_plugins: list[str] = _setting([], "plugin names not to load")
    request_timeout: float = _setting(10.0, "seconds the client waits for a peer", min=0.1)
    trust_mode: str = _setting("allowlist", "'allowlist': only trusted nodes run work here; "
                               "'open': anyone who can reach this server can (labs only)",
                               choices=("allowlist", "open"))
    transport: str = _setting("tls", "'tls': every connection between peers is TLS 1.3 bound to "
                              "node keys; 'http': plain text, for a lab you control",
                              choices=("tls", "http"))
    clock_window_seconds: int = _setting(60, "how far a signed request's time may be from ours",
                                         min=5, max=3600)
    advertise_addresses: list[str] = _setting([], "addresses to advertise instead of those found "
                                              "on the interfaces (a public address behind NAT)",
                                              each=lambda text: Address.parse(text))
    advertise_port: int = _setting(0, "port to advertise, if not the server's own (a forwarded "
                                   "port)", min=0, max=65535)
    bootstrap: list[str] = _setting([], "[NODE_ID@]ADDRESS[:PORT] of peers the server starts from",
                                    each=lambda text: parse_endpoint(text))
    refresh_seconds: int = _setting(300, "how often a running server updates its peer table "
                                    "(0: never)", min=0)
    update_hops: int = _setting(3, "hops 'peers update' goes by default", min=0, max=16)
    update_fanout: int = _setting(4, "peers each hop of an update asks: failing ones first, then "
                                  "those asked longest ago and some at random (all of them "
                                  "when the table holds no more)", min=1, max=4096)
    update_concurrency: int = _setting(16, "peers asked at once during an update", min=1,
                                       max=256)
    latency_probes: int = _setting(3, "round trips whose minimum is a peer's latency", min=1,
                                   max=20)
    peer_max_failures: int = _setting(3, "failed updates in a row before a peer is removed",
                                      min=1)
    max_records_per_response: int = _setting(500, "records one table exchange carries at most",
                                             min=1)
    max_table_bytes: int = _setting(4 << 20, "largest table answer a client reads", min=1024,
                                    unit="size")
    max_table_peers: int = _setting(5000, "most peers the table holds; new ones beyond are "
                                    "dropped", min=1)
    max_unverified_peers: int = _setting(4000, "most peers that never answered the table "
                                         "holds; the oldest give way to newer ones", min=1)
    exchange_newcomers_per_minute: int = _setting(60, "new peers one source (an IPv4 /24 or "
                                                  "IPv6 /48) may add to the table per minute; "
                                                  "also, per update, from one peer's answer",
                                                  min=0)
    peer_time_budget: float = _setting(15.0, "seconds an update spends on one peer, all its "
                                       "addresses and pages together", min=0.5)
    upnp: bool = _setting(True, "ask the home router (UPnP IGD, else NAT-PMP) to forward the "
                          "server's port (TCP, and UDP where it gives it), and advertise "
                          "the address it gives")
    punch: bool = _setting(True, "reach a node met through its relay over a punched UDP path "
                           "(QUIC) when both NATs allow it; the relay otherwise")
    use_relay: str = _setting("auto", "'auto': keep a connection to a relay and drop it once "
                              "a peer could dial this node back; 'always'; 'never'",
                              choices=("auto", "always", "never"))
    relays: list[str] = _setting([], "NODE_ID@ADDRESS[:PORT] of relays to use, in order "
                                 "(default: peers in the table that offer to relay)",
                                 each=lambda text: _relay_endpoint(text))
    relay: bool = _setting(False, "offer to relay for nodes that cannot be dialled (needs an "
                           "address others can reach)")
    relay_open: bool = _setting(False, "relay for any node, not only trusted ones")
    relay_max_nodes: int = _setting(1024, "most nodes this relay holds at once (each listens "
                                    "on one connection; one thread per worker holds them "
                                    "all)", min=1)
    relay_max_connections: int = _setting(512, "most connections this relay carries at once",
                                          min=1)
    relay_mbit: float = _setting(0.0, "bandwidth cap of one relayed connection, each way, in "
                                 "Mbit/s (0: none)", min=0)
    relay_poll_threads: int = _setting(12, "a relay's threads per worker, on top of 'threads', "
                                       "for the polls of waiting nodes; nodes it does not "
                                       "trust get at most half", min=2, max=1024)
    relay_stream_threads: int = _setting(16, "a relay's threads per worker, on top of "
                                         "'threads', for relayed streams being set up (a "
                                         "client's connect waits there for the node to "
                                         "accept); joined streams hold none", min=2,
                                         max=1024)
    relay_streams: int = _setting(512, "relayed streams one worker carries at once (one "
                                  "thread carries them all); the streams to one node get at "
                                  "most half", min=2, max=65536)
    relay_streams_per_key: int = _setting(3, "relayed streams one client key may hold at once, "
                                          "in each worker", min=1)
    relay_streams_per_network: int = _setting(4, "relayed streams one source network (an IPv4 "
                                              "/24 or IPv6 /64) may hold at once, in each "
                                              "worker", min=1)
    relay_polls_per_network: int = _setting(4, "places to wait (listening streams, polls) of "
                                            "nodes the relay does not trust that "
                                            "one source network may hold at once, in each "
                                            "worker", min=1)
    relay_idle_seconds: int = _setting(300, "a relayed stream with no byte either way for this "
                                       "long is closed (ssh through a relay sends keepalives)",
                                       min=1, unit="duration")
    backend: str = _setting("docker", "virtualization backend that runs containers")
    container_images: list[str] = _setting(["p2prc/base:latest"], "images callers may ask for; "
                                           "the first is the default")
    container_default_cpus: float = _setting(1.0, "CPUs a container gets unless it asks", min=0.01)
    container_max_cpus: float = _setting(2.0, "most CPUs a container may ask for", min=0.01)
    container_default_memory: int = _setting(512 << 20, "memory (bytes) a container gets unless "
                                             "it asks", min=16 << 20, unit="size")
    container_max_memory: int = _setting(4 << 30, "most memory (bytes) a container may ask for",
                                         min=16 << 20, unit="size")
    container_pids: int = _setting(512, "most processes in one container", min=16)
    container_max_ports: int = _setting(8, "most extra TCP ports one container may ask for",
                                        min=0)
    publish_ports: str = _setting("loopback", "'loopback': containers' ports are published on "
                                  "this host's loopback only and reached through the tunnel "
                                  "(p2prc ssh, forward, run); 'all': also on every address of "
                                  "this host, open to anyone on its networks",
                                  choices=("loopback", "all"))
    container_disk: int = _setting(10 << 30, "most disk (bytes) a container may write: its "
                                   "writable layer where the engine's storage can limit it, "
                                   "else a read-only root with this much writable space", min=0,
                                   unit="size")
    container_log_bytes: int = _setting(10 << 20, "most bytes the engine keeps of a "
                                        "container's output (its log)", min=1 << 20,
                                        unit="size")
    min_free_disk: int = _setting(2 << 30, "creates are refused while the engine's disk has "
                                  "less free than this (bytes)", min=0, unit="size")
    containers_reach_lan: bool = _setting(True, "let containers open connections to this "
                                          "host's networks (private addresses); cloud metadata "
                                          "services are refused either way")
    containers_per_caller: int = _setting(4, "containers one caller may hold at once", min=1)
    container_warm_pool: int = _setting(0, "containers of the default image kept started for "
                                        "the next callers, each handed to one caller only "
                                        "(raise it on a host that friends use for many short "
                                        "jobs, p2prc exec; they count against its ports)",
                                        min=0, max=64)
    gpu_share: bool = _setting(False, "let several containers hold one GPU at once (else each "
                               "GPU has one holder)")
    gpus_per_caller: int = _setting(1, "GPUs one caller may hold at once, all its containers "
                                    "together (0: no limit)", min=0)
    container_default_ttl: int = _setting(86400, "seconds a container lives unless it asks",
                                          min=60, unit="duration")
    container_max_ttl: int = _setting(7 * 86400, "most seconds a container may live", min=60,
                                      unit="duration")
    reap_seconds: float = _setting(10.0, "how often the server looks for expired or stopped "
                                   "containers", min=0.5)
    container_exited_grace: int = _setting(300, "seconds a stopped container (its main process "
                                           "ended, or was killed for memory) keeps its ports, "
                                           "GPUs and place before it is removed", min=0,
                                           unit="duration")
    port_range: str = _setting("42000-42999", "host ports the server maps containers' ports to",
                               check=lambda text: parse_port_range(text))
    ssh_key: str = _setting("", "the SSH key p2prc logs in with (default: made on first use in "
                            "$P2PRC_HOME/ssh)")
    exec_max_input: int = _setting(8 << 30, "most bytes of inputs 'p2prc exec' sends (-i)",
                                   min=0, unit="size")
    exec_max_output: int = _setting(1 << 30, "most bytes of outputs 'p2prc exec' takes back "
                                    "from a host (-o); more is refused", min=0, unit="size")

    @property
    def display_name(self) -> str:
        return self.name or socket.gethostname()


_FIELDS = {f.name: f for f in fields(Settings)}


def default_home() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "HOME") or Path.home() / ".p2prc").expanduser()


@dataclass
class LoadedSettings:
    """Settings with the place each value came from."""

    settings: Settings
    home: Path
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)  # P2PRC_ variables that set nothing


def load_settings(home: Path | None = None, overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> LoadedSettings:
    """Build the effective settings for the node whose home is ``home``.

    :raises ConfigError: naming the file or variable, the key and the problem.
    """
    home = home or default_home()
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    sources = {name: "default" for name in _FIELDS}

    path = home / CONFIG_FILE
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        for key, raw in data.items():
            values[key] = _check(key, raw, str(path))
            sources[key] = str(path)

    warnings = []
    known = {ENV_PREFIX + name.upper() for name in _FIELDS} | NOT_SETTINGS
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in known:
            near = difflib.get_close_matches(var, sorted(known), n=1)
            warnings.append(f"{var} is not a p2prc setting and is ignored"
                            + (f"; did you mean {near[0]}?" if near else ""))
    for name in _FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in environ and var != ENV_PREFIX + "HOME":
            values[name] = _check(name, _from_text(name, environ[var], var), var)
            sources[name] = var

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        values[key] = _check(key, raw, "command line")
        sources[key] = "command line"

    return LoadedSettings(Settings(**values), home, sources, warnings)


def _from_text(name: str, text: str, where: str) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "bool":
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if _FIELDS[name].metadata.get("unit"):
                return text  # "4G", "7d": read by _check, as in config.toml
            if not text.strip().lstrip("-").isdigit():
                raise ValueError(f"expected a whole number, got {text!r}")
            return int(text)
        if kind == "float":
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        if kind == "list[str]":
            return [part.strip() for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"{where}: {name}: {err}") from None
    return text


def _check(key: str, value: Any, where: str) -> Any:
    spec = _FIELDS.get(key)
    if spec is None:
        near = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}: unknown setting {key!r}{hint}")
    kind = spec.type
    unit = spec.metadata.get("unit")
    if unit and isinstance(value, str):  # "4G", "512M"; "7d", "2h"
        try:
            value = parse_size(value) if unit == "size" else parse_duration(value)
        except ValueError as err:
            raise ConfigError(f"{where}: {key}: {err}") from None
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[str(kind)]
    if not ok:
        raise ConfigError(f"{where}: {key}: expected {_KIND_WORDS[str(kind)]}, got {value!r}")
    meta = spec.metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: {key}: must be at least {_said(meta['min'], unit)}, got "
                          f"{_said(value, unit)}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: {key}: must be at most {_said(meta['max'], unit)}, got "
                          f"{_said(value, unit)}")
    if "check" in meta:
        try:
            meta["check"](value)
        except ValueError as err:
            raise ConfigError(f"{where}: {key}: {err}") from None
    for item in value if "each" in meta else ():
        try:
            meta["each"](item)
        except ValueError as err:
            raise ConfigError(f"{where}: {key}: {err}") from None
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: {key}: must be one of {', '.join(meta['choices'])}, "
                          f"got {value!r}")
    return float(value) if kind == "float" else value


def _said(value: Any, unit: str | None) -> str:
    """A limit as people write it: 16M (bytes), 60s; else as it is."""
    if unit == "size" and isinstance(value, int):
        for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value // size}{suffix} ({value} bytes)"
        return f"{value} bytes"
    if unit == "duration" and isinstance(value, int):
        return f"{value}s"
    return repr(value)


_KIND_WORDS = {"str": "a string", "bool": "true or false", "int": "a whole number",
               "float": "a number", "list[str]": "a list of strings"}


def _relay_endpoint(text: str) -> Any:
    endpoint = parse_endpoint(text)
    if endpoint.node_id is None:
        raise ValueError(f"{text!r}: name the relay's node as NODE_ID@ADDRESS[:PORT], so that "
                         f"no other node can pose as it")
    return endpoint


def parse_port_range(text: str) -> tuple[int, int]:
    """``"42000-42999"`` to (42000, 42999). :raises ValueError: not such a range."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"{text!r} is not a port range like 42000-42999")
    low, high = int(first), int(last)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: ports must be from 1024 to 65535, the first no larger "
                         f"than the last")
    return low, high


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(Settings)}


def default_config_text() -> str:
    """The commented config that ``p2prc init`` writes: every setting at its default."""
    lines = ["# p2prc node settings. Environment variables P2PRC_<NAME> and command-line",
             "# flags override these. Uncomment a line to change it.", ""]
    for f in fields(Settings):
        lines.append(f"# {f.metadata['doc']}")
        lines.append(f"# {f.name} = {toml_value(getattr(Settings(), f.name))}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """A value as config.toml writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)
