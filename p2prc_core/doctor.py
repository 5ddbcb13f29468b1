"""How this node stands (``p2prc status``) and what stands between it and working well,
each with its fix (``p2prc doctor``)."""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from p2prc_core.addresses import local_addresses
from p2prc_core.errors import P2PRCError
from p2prc_core.models import Address, Endpoint
from p2prc_core.own_node import advertised_with_mapping
from p2prc_core.storage import SERVER_DB
from p2prc_core.udp_probe import KINDS

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
    seen = seen_by_peers(state.observed, s.allow_loopback)
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
        "containers": _container_state(node), "on_peers": _on_peers_state(node),
        "gpus": [g.get("name") for g in node.own.gpus() if isinstance(g, dict)],
        "checked": now}


def seen_by_peers(observed: dict[str, dict[str, Any]],
                  allow_loopback: bool) -> dict[str, dict[str, Any]]:
    """The addresses peers said they saw this node's requests come from, that say how peers
    see it: never loopback (a relay hands its streams on over loopback, and a node on this
    same machine sees it there), unless this node allows loopback (a lab on one machine);
    never link-local or unspecified."""
    kept = {}
    for address, seen in observed.items():
        try:
            usable = Address.parse(address).usable(allow_loopback)
        except ValueError:
            continue
        if usable and isinstance(seen.get("last"), int | float):
            kept[address] = seen
    return kept


def _reach_state(node: NodeServices) -> dict[str, Any]:
    """What the running server learnt of how others reach it (``reach.ReachState``): the
    dial-back result, the port mapping (UPnP, PCP or NAT-PMP), the relay in use; and a one-word
    summary."""
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
    udp = state.get("udp") if isinstance(state.get("udp"), dict) else None
    if udp is not None and not (udp.get("kind") in KINDS and isinstance(
            udp.get("detail"), str) and isinstance(udp.get("checked"), int | float)):
        udp = None  # not as udp_mapping writes it: as if never checked
    from p2prc_core.own_mapping import mapping_of
    from p2prc_core.punched import punched_lately

    mapped = mapping_of(state)
    return {"summary": summary, "dial_back": checked, "upnp": upnp, "relay": relay,
            "use_relay": node.settings.use_relay, "relay_offered": node.settings.relay,
            "udp": udp, "udp_port": None if mapped is None else
            {"address": mapped[0], "port": mapped[1]},
            "punched": sorted(punched_lately(node.home))}


def _server_state(node: NodeServices) -> dict[str, Any]:
    """Whether this node's own server answers on its port, as this node's key."""
    from p2prc_core.client import PeerClient

    served = node.own.served_settings  # a server started with --port says where, in server.json
    first: dict[str, Any] | None = None
    for host in own_server_hosts(served.host):
        endpoint = Endpoint(host, served.port, node.identity.node_id)
        try:
            with PeerClient(endpoint, timeout=2.0, secure=node.peers.secure) as client:
                health = client.health()
            return {"running": True, "at": str(endpoint), "version": health.version,
                    "uptime_seconds": health.uptime_seconds}
        except P2PRCError as err:
            first = first or {"running": False, "at": str(endpoint), "why": str(err)}
    assert first is not None
    return first


def own_server_hosts(host: str) -> list[str]:
    """Where this machine dials its own server bound to ``host``: loopback for a server on
    every address, IPv6's first and then IPv4's (with IPv6 disabled, ``::1`` is not there
    while a server bound to ``::`` still serves IPv4)."""
    if host in ("", "::"):
        return ["::1", "127.0.0.1"]
    if host == "0.0.0.0":
        return ["127.0.0.1"]
    return [host]


def _container_state(node: NodeServices) -> dict[str, Any]:
    """The containers this node hosts for others (not the user's own: those are on peers).
    A node that never hosted one is not asked about its engine's."""
    if not node.own.publishes() and not (
            (node.home / SERVER_DB).exists() and node.hosting.store.leases()):
        return {"engine": "not asked", "hosting": False, "running": 0, "leases": 0}
    try:
        leases = node.hosting.service().list_leases()
    except P2PRCError as err:
        return {"engine": "unavailable", "hosting": True, "why": str(err)}
    return {"engine": "up", "hosting": True,
            "running": sum(1 for lease in leases if lease.state == "running"),
            "leases": len(leases)}


def _on_peers_state(node: NodeServices) -> dict[str, Any]:
    """The containers the user holds on peers (as this client tracks them): how many, on
    how many hosts; expired ones are left out."""
    now = time.time()
    held = [c for c in node.tracked.containers().values() if c.expires > now]
    return {"containers": len(held),
            "hosts": len({c.node_id or c.endpoint for c in held})}


def diagnose(node: NodeServices) -> list[Check]:
    """Every check, in the order a user would fix them."""
    status = node_status(node)
    engine = _engine(node)
    image = _image(node) if engine.result == "ok" else \
        Check("base image", "skip", "no engine to ask (see the container engine's fix)")
    return [engine, image, _server(node, status), _clock(node), _ipv6(),
            _reach(node, status), _udp(node), _gpu(node)]


def _engine(node: NodeServices) -> Check:
    """Whether the backend answers; where ``DOCKER_HOST`` sends the engine's client
    elsewhere, the fix names it (the usual cause when dockerd runs and still no answer)."""
    try:
        node.hosting.backend().containers()
    except P2PRCError as err:
        docker_host = os.environ.get("DOCKER_HOST")
        if docker_host and node.settings.backend == "docker":
            return Check("container engine", "fail", str(err),
                         f"DOCKER_HOST={docker_host} (in this environment) sends p2prc to "
                         f"an engine that does not answer: unset DOCKER_HOST, or point it at "
                         f"a running engine")
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
    own = node.own.running_server()
    if own is not None:
        return Check("server", "fail", f"this node's server (pid {own.pid}) runs but does not "
                                       f"answer at {server['at']}: {server['why']}",
                     "see its log; stop it (kill its pid) and start it again")
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
                     f"forward port {status['port']} on your router (or enable UPnP or "
                     f"NAT-PMP/PCP) for direct, faster connections")
    if reach["summary"] == "unreachable":
        return Check("reach", "fail", f"a peer could not dial this node back at "
                                      f"{reach['dial_back']['address']}, and it has no relay",
                     "add a relay: relays = [\"NODE_ID@ADDRESS:PORT\"] (a friend's node with "
                     "relay = true), or forward the port on your router, or enable UPnP or "
                     "NAT-PMP/PCP on it")
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


def udp_mapping(node: NodeServices) -> dict[str, Any]:
    """Ask up to three peers that answer lately, over UDP at their p2prc port, where this
    node's UDP comes from; what that says of its NAT (``udp_probe.classify``), kept in
    ``reach.json`` for ``p2prc status``."""
    from p2prc_core import udp_probe
    from p2prc_core.reach_state import ReachState

    answering = sorted((e for e in node.peers.entries().values()
                        if e.measured.last_seen is not None),
                       key=lambda e: -(e.measured.last_seen or 0))
    targets: list[tuple[str, int, str]] = []
    for entry in answering:
        direct = [e for e in node.peers.endpoints(entry) if not e.relay and _is_ipv4(e.host)]
        last = [e for e in direct if e.path == entry.measured.address]  # where it answered
        for endpoint in (last + direct)[:1]:
            targets.append((endpoint.host, endpoint.port, entry.node_id))
        if len(targets) == 3:
            break
    local_port, seen = udp_probe.ask(targets, node.identity)
    ours = {str(a.ip) for a in local_addresses() if a.version == 4} | {"127.0.0.1"}
    mapping = udp_probe.classify(ours, local_port, len(targets), seen)
    found = {"kind": mapping.kind, "detail": mapping.detail, "checked": time.time(),
             "seen": [asdict(s) for s in seen]}
    ReachState(node.home).update(udp=found)
    return found


def _is_ipv4(host: str) -> bool:
    try:
        return Address.parse(host).version == 4
    except ValueError:
        return False  # a name: its address may change between asks


def _udp(node: NodeServices) -> Check:
    found = udp_mapping(node)
    kind, detail = found["kind"], found["detail"]
    if kind in ("none", "endpoint-independent"):
        return Check("UDP", "ok", f"{'no NAT' if kind == 'none' else kind}: {detail}")
    if kind == "symmetric":
        return Check("UDP", "warn", f"symmetric NAT: {detail}",
                     "a friend also behind NAT reaches this node through a relay; a router "
                     "that keeps one mapping per port (most home routers do), or port "
                     f"{node.settings.port} forwarded, lets peers come direct")
    if kind == "blocked":
        return Check("UDP", "warn", detail,
                     f"allow UDP to and from port {node.settings.port}; meanwhile peers "
                     f"behind NAT meet this node through a relay")
    return Check("UDP", "skip", detail, "p2prc peers update (then p2prc doctor again)")


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
