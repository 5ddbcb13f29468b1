"""How this node stands (``p2prc status``) and what stands between it and working well,
each with its fix (``p2prc doctor``)."""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from p2prc_core.addresses import local_addresses
from p2prc_core.errors import P2PRCError
from p2prc_core.models import Endpoint
from p2prc_core.own_node import advertised_with_mapping

if TYPE_CHECKING:
    from p2prc_core.services import NodeServices


@dataclass
class Check:
    name: str
    result: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def node_status(node: NodeServices) -> dict[str, Any]:
    """This node at a glance: who it is, whether its server answers, its addresses and
    how peers see it, its peers, containers, engine and GPUs. Never raises for a part
    that is missing; it says so."""
    s = node.settings
    state = node.table.snapshot()
    now = time.time()
    reach = _reach_state(node)
    advertised = advertised_with_mapping(s, node.hooks, reach)  # as the record says
    seen = {a: v for a, v in state.observed.items() if isinstance(v.get("last"), int | float)}
    answering = [e for e in state.peers.values()
                 if e.measured.failures == 0 and e.measured.last_seen is not None]
    return {
        "node_id": node.identity.node_id, "name": s.display_name, "transport": s.transport,
        "port": s.advertise_port or s.port, "server": _server_state(node),
        "addresses": [{"address": a, "seen_by_peers": a in seen} for a in advertised],
        "observed": [{"address": a, "last": v["last"], "by": v.get("by", []),
                      "advertised": a in advertised}
                     for a, v in sorted(seen.items(), key=lambda i: -i[1]["last"])],
        "behind_nat": bool(seen) and not any(a in advertised for a in seen),
        "peers": {"known": len(state.peers), "answering": len(answering),
                  "never_answered": sum(1 for e in state.peers.values()
                                        if e.measured.last_seen is None)},
        "reach": reach,
        "containers": _container_state(node), "gpus": [g.get("name") for g in node.own.gpus()
                                                        if isinstance(g, dict)],
        "checked": now}


def _reach_state(node: NodeServices) -> dict[str, Any]:
    """What the running server learnt of how others reach it (``reach.ReachState``): the
    dial-back result, the UPnP mapping, the relay in use; and a one-word summary."""
    from p2prc_core.reach_state import ReachState

    state = ReachState(node.home).read()
    checked = state.get("reachable") if isinstance(state.get("reachable"), dict) else None
    upnp = state.get("upnp") if isinstance(state.get("upnp"), dict) else None
    relay = state.get("relay") if isinstance(state.get("relay"), str) else None
    if checked and checked.get("reachable") is True:
        summary = "direct"
    elif relay:
        summary = "relay"
    elif checked:
        summary = "unreachable"
    else:
        summary = "unknown"
    return {"summary": summary, "dial_back": checked, "upnp": upnp, "relay": relay,
            "use_relay": node.settings.use_relay, "relay_offered": node.settings.relay}


def _server_state(node: NodeServices) -> dict[str, Any]:
    """Whether this node's own server answers on its port, as this node's key."""
    from p2prc_core.client import PeerClient

    served = node.own.served_settings  # a server started with --port says where, in server.json
    host = served.host
    host = "::1" if host == "::" else "127.0.0.1" if host == "0.0.0.0" else host
    endpoint = Endpoint(host, served.port, node.identity.node_id)
    try:
        with PeerClient(endpoint, timeout=2.0, secure=node.peers.secure) as client:
            health = client.health()
        return {"running": True, "at": str(endpoint), "version": health.version,
                "uptime_seconds": health.uptime_seconds}
    except P2PRCError as err:
        return {"running": False, "at": str(endpoint), "why": str(err)}


def _container_state(node: NodeServices) -> dict[str, Any]:
    try:
        leases = node.hosting.service().list_leases()
    except P2PRCError as err:
        return {"engine": "unavailable", "why": str(err)}
    return {"engine": "up", "running": sum(1 for lease in leases
                                           if lease.state == "running"),
            "leases": len(leases)}


def diagnose(node: NodeServices) -> list[Check]:
    """Every check, in the order a user would fix them."""
    status = node_status(node)
    return [_engine(node), _image(node), _server(node, status), _clock(node), _ipv6(),
            _reach(node, status), _gpu(node)]


def _engine(node: NodeServices) -> Check:
    try:
        node.hosting.backend().containers()
    except P2PRCError as err:
        return Check("container engine", "fail", str(err),
                     "as root: bash scripts/docker-engine (installs and starts Debian's "
                     "Docker engine), or start dockerd")
    return Check("container engine", "ok", f"the {node.settings.backend} backend answers")


def _image(node: NodeServices) -> Check:
    wanted = node.settings.container_images[0]
    try:
        names = {image.get("name") for image in node.hosting.backend().images()}
    except P2PRCError as err:
        return Check("base image", "skip", f"no engine to ask ({err})")
    if wanted not in names:
        return Check("base image", "fail", f"{wanted} is not on this host",
                     "p2prc image build --from-debootstrap (as root; no registry needed)")
    return Check("base image", "ok", f"{wanted} is here")


def _server(node: NodeServices, status: dict[str, Any]) -> Check:
    server = status["server"]
    if server["running"]:
        return Check("server", "ok", f"running at {server['at']}")
    port = node.settings.port
    if _port_taken(port):
        return Check("server", "fail", f"not running, and port {port} is taken by another "
                                       f"program", "p2prc server --port OTHER_PORT")
    return Check("server", "warn", "not running: peers cannot use this machine",
                 "p2prc server (or bash scripts/serve)")


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def _clock(node: NodeServices) -> Check:
    """This clock against the peers that answer (their /v1/health says their time)."""
    window = node.settings.clock_window_seconds
    offsets = []
    entries = [e for e in node.peers.entries().values() if e.measured.last_seen is not None]
    for entry in entries[:3]:
        try:
            with node.peers.client(entry.node_id) as client:
                started = time.time()
                health = client.health()
                ended = time.time()
        except P2PRCError:
            continue
        if health.time is not None:
            offsets.append(health.time - (started + ended) / 2)
    if not offsets:
        return Check("clock", "skip", "no peer answered to compare clocks with")
    offset = sorted(offsets)[len(offsets) // 2]
    if abs(offset) > window / 2:
        return Check("clock", "fail", f"this clock is {offset:+.0f} s from its peers'; signed "
                                      f"requests allow {window} s",
                     "sync it: timedatectl set-ntp true (or install chrony)")
    return Check("clock", "ok", f"within {abs(offset):.1f} s of {len(offsets)} peer(s)")


def _ipv6() -> Check:
    found = [a for a in local_addresses() if a.version == 6
             and a.kind in ("global", "unique-local", "private")]
    if not found:
        return Check("IPv6", "warn", "no routable IPv6 address: peers reach this node over "
                                     "IPv4 only", "ask your provider or router for IPv6")
    return Check("IPv6", "ok", ", ".join(str(a) for a in found[:3]))


def _reach(node: NodeServices, status: dict[str, Any]) -> Check:
    reach = status["reach"]
    if not status["server"]["running"] and not status["behind_nat"]:
        return Check("reach", "skip", "no server runs here: a client only, nothing to reach",
                     "p2prc server, to host containers for friends")
    if reach["summary"] == "direct":
        return Check("reach", "ok", f"a peer dialled this node back at "
                                    f"{reach['dial_back']['address']}")
    if reach["summary"] == "relay":
        return Check("reach", "warn", f"peers cannot dial this node; they reach it through "
                                      f"relay {reach['relay']}",
                     f"forward port {status['port']} on your router (or enable UPnP on it) "
                     f"for direct, faster connections")
    if reach["summary"] == "unreachable":
        return Check("reach", "fail", f"a peer could not dial this node back at "
                                      f"{reach['dial_back']['address']}, and it has no relay",
                     "add a relay: relays = [\"NODE_ID@ADDRESS:PORT\"] (a friend's node with "
                     "relay = true), or forward the port on your router, or enable UPnP")
    if not status["observed"]:
        return Check("reach", "skip", "no peer has told this node how it sees it yet",
                     "p2prc peers update")
    if status["behind_nat"]:
        seen = status["observed"][0]["address"]
        return Check("reach", "fail", f"behind NAT: peers see this node as {seen}, which it "
                                      f"does not advertise, so they cannot dial it",
                     f"forward port {status['port']} on your router to this machine and set "
                     f"advertise_addresses = [\"{seen}\"]")
    return Check("reach", "ok", "peers see an address this node advertises")


def _gpu(node: NodeServices) -> Check:
    if not node.own.gpus():
        return Check("GPU", "skip", "no NVIDIA GPU on this machine")
    try:
        usable = node.hosting.backend().gpu_available()
    except P2PRCError as err:
        return Check("GPU", "skip", f"no engine to ask ({err})")
    if not usable:
        return Check("GPU", "warn", "an NVIDIA GPU, but the engine cannot give it to "
                                    "containers", "install NVIDIA's container toolkit")
    return Check("GPU", "ok", "containers can be given the GPU")
