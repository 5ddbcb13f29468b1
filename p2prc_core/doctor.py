"""``p2prc doctor``: what stands between this node and working well, each with its fix."""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from p2prc_core.errors import P2PRCError
from p2prc_core.node import local_addresses

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


def diagnose(node: NodeServices) -> list[Check]:
    """Every check, in the order a user would fix them."""
    status = node.status()
    return [_engine(node), _image(node), _server(node, status), _clock(node), _ipv6(),
            _reach(node, status), _gpu(node)]


def _engine(node: NodeServices) -> Check:
    try:
        node.backend().containers()
    except P2PRCError as err:
        return Check("container engine", "fail", str(err),
                     "as root: bash scripts/docker-engine (installs and starts Debian's "
                     "Docker engine), or start dockerd")
    return Check("container engine", "ok", f"the {node.settings.backend} backend answers")


def _image(node: NodeServices) -> Check:
    wanted = node.settings.container_images[0]
    try:
        names = {image.get("name") for image in node.backend().images()}
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
    entries = [e for e in node.table.load().values() if e.measured.last_seen is not None]
    for entry in entries[:3]:
        try:
            with node.client(entry.node_id) as client:
                started = time.time()
                health = client.health()
                ended = time.time()
        except P2PRCError:
            continue
        theirs = health.get("time")
        if isinstance(theirs, int | float) and not isinstance(theirs, bool):
            offsets.append(theirs - (started + ended) / 2)
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
    if not node.gpus():
        return Check("GPU", "skip", "no NVIDIA GPU on this machine")
    try:
        usable = node.backend().gpu_available()
    except P2PRCError as err:
        return Check("GPU", "skip", f"no engine to ask ({err})")
    if not usable:
        return Check("GPU", "warn", "an NVIDIA GPU, but the engine cannot give it to "
                                    "containers", "install NVIDIA's container toolkit")
    return Check("GPU", "ok", "containers can be given the GPU")
