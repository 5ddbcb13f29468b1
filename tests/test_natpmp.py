"""NAT-PMP (RFC 6886) against a gateway made here on loopback, honest and not: what a router
answers is untrusted input. (The real thing, miniupnpd speaking NAT-PMP only, is in
test_natlab.py.)"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fake_gateway import Answer, mapper_maker

from p2prc_core.natpmp import MAX_LEASE, NatPmpError, NatPmpMapper


def honest(request: bytes) -> list[bytes]:
    if request == b"\0\0":
        return [struct.pack(">BBHI4s", 0, 128, 0, 7, socket.inet_aton("203.0.113.9"))]
    _, op, _, internal, external, lease = struct.unpack(">BBHHHI", request)
    return [struct.pack(">BBHIHHI", 0, 128 + op, 0, 7, internal, external or 0,
                        min(lease, 1800))]


@pytest.fixture
def gateway() -> Iterator[Callable[[Answer], NatPmpMapper]]:
    """A fake gateway on 127.0.0.1 that answers each request as it is told; the mapper
    it makes has ``asked``, what the gateway was asked."""
    with mapper_maker(NatPmpMapper, honest) as make:
        yield make


def test_an_honest_gateway_maps_renews_and_unmaps(
        gateway: Callable[[Answer], NatPmpMapper]) -> None:
    mapper = gateway(honest)
    assert mapper.discover() and mapper.external_ip() == "203.0.113.9"
    mapping = mapper.map(8088, lease_seconds=3600)
    assert (mapping.external_ip, mapping.external_port, mapping.internal_port,
            mapping.lease_seconds, mapping.internal_ip) == ("203.0.113.9", 8088, 8088, 1800,
                                                            "127.0.0.1")
    assert mapping.gateway == "NAT-PMP at 127.0.0.1"
    assert mapper.renew(mapping).external_port == 8088
    mapper.unmap(mapping)
    assert mapper.asked[-1] == struct.pack(">BBHHHI", 0, 2, 0, 8088, 0, 0)  # type: ignore


def test_a_gateway_that_says_no_is_said_plainly(
        gateway: Callable[[Answer], NatPmpMapper]) -> None:
    def refuses(request: bytes) -> list[bytes]:
        if request == b"\0\0":
            return honest(request)
        return [struct.pack(">BBHIHHI", 0, 130, 2, 7, 8088, 0, 0)]

    with pytest.raises(NatPmpError, match="refused: not authorized"):
        gateway(refuses).map(8088)


@pytest.mark.parametrize("lie", [
    lambda r: [honest(r)[0][:-1]],                           # one byte short
    lambda r: [honest(r)[0] + b"\0"],                        # one byte long
    lambda r: [b"\1" + honest(r)[0][1:]],                    # another version
    lambda r: [bytes([0, 129]) + honest(r)[0][2:]],          # an answer to another opcode
    lambda r: [],                                            # silence
    lambda r: [b"junk"] * 200,                               # a flood of nothing
])
def test_a_gateway_that_answers_wrongly_is_not_a_gateway(
        gateway: Callable[[Answer], NatPmpMapper], lie: Answer) -> None:
    started = time.monotonic()
    assert gateway(lie).discover() is False
    assert time.monotonic() - started < 2  # three tries, then it gives up


def test_a_mapping_of_another_port_is_refused(
        gateway: Callable[[Answer], NatPmpMapper]) -> None:
    def other(request: bytes) -> list[bytes]:
        if request == b"\0\0":
            return honest(request)
        return [struct.pack(">BBHIHHI", 0, 130, 0, 7, 22, 8088, 3600)]

    with pytest.raises(NatPmpError, match="mapping of port 22"):
        gateway(other).map(8088)


def test_answers_from_elsewhere_are_passed_over() -> None:
    """A stranger on the LAN races the gateway with a forged answer: not taken."""
    real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    real.bind(("127.0.0.1", 0))
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind(("127.0.0.1", 0))

    def serve() -> None:
        request, peer = real.recvfrom(64)
        forged = struct.pack(">BBHI4s", 0, 128, 0, 7, socket.inet_aton("6.6.6.6"))
        forger.sendto(forged, peer)  # first: loopback keeps the order they are sent in
        real.sendto(honest(request)[0], peer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        mapper = NatPmpMapper("127.0.0.1", timeout=0.5, port=real.getsockname()[1])
        assert mapper.external_ip() == "203.0.113.9"
    finally:
        real.close()
        forger.close()


def test_renewing_a_lease_the_gateway_made_longer_than_allowed_works(
        gateway: Callable[[Answer], NatPmpMapper]) -> None:
    def generous(request: bytes) -> list[bytes]:
        if request == b"\0\0":
            return honest(request)
        _, op, _, internal, external, _ = struct.unpack(">BBHHHI", request)
        return [struct.pack(">BBHIHHI", 0, 128 + op, 0, 7, internal, external, MAX_LEASE + 1)]

    mapper = gateway(generous)
    mapping = mapper.map(8088)
    assert mapper.renew(mapping).external_port == 8088  # not a ValueError: asked again


def test_a_renewal_that_comes_back_elsewhere_is_not_advertised(tmp_path: Path) -> None:
    """The router restarted and now forwards another address or port: the record still says
    the old one, so the forward is given up (and said), not kept silently."""
    from p2prc_core.reach_state import ReachState
    from p2prc_core.router_port import RouterPort
    from p2prc_core.upnp import Mapping

    first = Mapping("203.0.113.9", 8088, "192.168.1.5", 8088, "TCP", 60, "NAT-PMP at gw")
    moved = Mapping("203.0.113.77", 40001, "192.168.1.5", 8088, "TCP", 60, "NAT-PMP at gw")
    removed: list[Mapping] = []
    state = ReachState(tmp_path)
    stop = threading.Event()
    router = RouterPort(state, stop)
    mapper = SimpleNamespace(renew=lambda m: moved, unmap=removed.append)
    router.mapping, router._mapper = first, mapper
    state.update(upnp={"external_ip": first.external_ip, "external_port": 8088,
                       "gateway": first.gateway})
    waits = iter([False, True])  # one renewal, then stop
    stop.wait = lambda timeout=None: next(waits)  # type: ignore[method-assign]
    router._renew(8088)
    assert router.mapping is None and state.read()["upnp"] is None and removed == [moved]


def test_udp_is_mapped_with_its_own_opcode_and_removed_the_same_way(
        gateway: Callable[[Answer], NatPmpMapper]) -> None:
    mapper = gateway(honest)
    mapping = mapper.map(8088, protocol="UDP")
    assert mapping.protocol == "UDP"
    assert mapper.asked[-1][:2] == bytes([0, 1])  # type: ignore[attr-defined]
    assert mapper.renew(mapping).protocol == "UDP"
    mapper.unmap(mapping)
    assert mapper.asked[-1] == struct.pack(">BBHHHI", 0, 1, 0, 8088, 0, 0)  # type: ignore
    with pytest.raises(ValueError, match="protocol"):
        mapper.map(8088, protocol="SCTP")


class Router:
    """A stand-in mapper: TCP as asked; UDP as ``udp`` says (a mapping, or an error)."""

    def __init__(self, udp: Any):
        self.udp, self.removed = udp, []

    def map(self, port: int, external_port: int, description: str = "",
            protocol: str = "TCP") -> Any:
        from p2prc_core.upnp import Mapping

        if protocol == "UDP":
            if isinstance(self.udp, Exception):
                raise self.udp
            return self.udp
        return Mapping("11.0.0.9", port, "192.168.1.5", port, "TCP", 3600, "a router")

    def unmap(self, mapping: Any) -> None:
        self.removed.append(mapping)


@pytest.mark.parametrize("udp,kept", [
    (NatPmpError("the gateway 10.0.0.1 refused: out of resources"), False),
    ("other port", False),
    ("same", True),
])
def test_the_udp_forward_is_kept_only_at_the_tcp_forwards_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, udp: Any, kept: bool) -> None:
    from p2prc_core import natpmp
    from p2prc_core.reach_state import ReachState
    from p2prc_core.router_port import RouterPort
    from p2prc_core.upnp import Mapping

    if udp == "same":
        udp = Mapping("11.0.0.9", 8088, "192.168.1.5", 8088, "UDP", 3600, "a router")
    elif udp == "other port":
        udp = Mapping("11.0.0.9", 40000, "192.168.1.5", 8088, "UDP", 3600, "a router")
    router = Router(udp)
    monkeypatch.setattr(natpmp, "find_gateway", lambda home=None: router)
    state = ReachState(tmp_path)
    port = RouterPort(state, threading.Event())
    port.map(8088, "p2prc test")
    assert port.mapping is not None and port.mapping.protocol == "TCP"  # TCP stands
    assert state.read()["upnp"]["udp"] is kept and (port.udp is not None) is kept
    assert (udp in router.removed) is (isinstance(udp, Mapping) and not kept)
    port._stop.set()
    port.unmap()
    assert port.mapping is None and port.udp is None


def test_a_udp_renewal_that_comes_back_elsewhere_drops_udp_alone(tmp_path: Path) -> None:
    from p2prc_core.reach_state import ReachState
    from p2prc_core.router_port import RouterPort
    from p2prc_core.upnp import Mapping

    tcp = Mapping("11.0.0.9", 8088, "192.168.1.5", 8088, "TCP", 60, "a router")
    udp = Mapping("11.0.0.9", 8088, "192.168.1.5", 8088, "UDP", 60, "a router")
    moved = Mapping("11.0.0.9", 40001, "192.168.1.5", 8088, "UDP", 60, "a router")
    removed: list[Mapping] = []
    state = ReachState(tmp_path)
    state.update(upnp={"external_ip": "11.0.0.9", "external_port": 8088, "gateway": "a router",
                       "udp": True})
    stop = threading.Event()
    router = RouterPort(state, stop)
    router.mapping, router.udp = tcp, udp
    router._mapper = SimpleNamespace(renew=lambda m: m if m.protocol == "TCP" else moved,
                                     unmap=removed.append)
    waits = iter([False, True])  # one renewal, then stop
    stop.wait = lambda timeout=None: next(waits)  # type: ignore[method-assign]
    router._renew(8088)
    assert router.mapping == tcp and router.udp is None and removed == [moved]
    assert state.read()["upnp"]["udp"] is False and state.read()["upnp"]["external_port"] == 8088
