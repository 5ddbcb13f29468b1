"""PCP (RFC 6887) against a gateway made here on loopback, honest and not: what a router
answers is untrusted input. (The real thing, miniupnpd, is in test_natlab.py.)"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_gateway import Answer, mapper_maker

from p2prc_core.pcp import NotPcp, PcpError, PcpMapper

EXTERNAL = "203.0.113.9"


def _v6(address: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{address}").packed


def honest(request: bytes, external: str = EXTERNAL, port_offset: int = 0) -> list[bytes]:
    """A PCP server: ANNOUNCE answered, MAP answered with the suggested port (or one
    ``port_offset`` above it) and a lease of at most 1800 s."""
    version, opcode, _, lifetime = struct.unpack(">BBHI", request[:8])
    if opcode == 0:
        return [struct.pack(">BBBBII12x", 2, 128, 0, 0, 0, 77)]
    nonce, protocol, internal, suggested = struct.unpack(">12sB3xHH", request[24:44])
    given = 0 if lifetime == 0 else (suggested or internal) + port_offset
    return [struct.pack(">BBBBII12x", 2, 129, 0, 0, min(lifetime, 1800), 77)
            + struct.pack(">12sB3xHH16s", nonce, protocol, internal, given, _v6(external))]


def natpmp_only(request: bytes) -> list[bytes]:
    """A NAT-PMP server's answer to any other version: version 0, "unsupported version"."""
    return [struct.pack(">BBHI", 0, 128 + request[1], 1, 77)]


@pytest.fixture
def gateway() -> Iterator[Callable[[Answer], PcpMapper]]:
    """A fake gateway on 127.0.0.1 that answers each request as it is told; the mapper
    it makes has ``asked``, what the gateway was asked."""
    with mapper_maker(PcpMapper, honest) as make:
        yield make


def test_an_honest_gateway_maps_renews_and_unmaps_with_one_nonce(
        gateway: Callable[[Answer], PcpMapper]) -> None:
    mapper = gateway(honest)
    assert mapper.discover()
    mapping = mapper.map(8088, lease_seconds=3600)
    assert (mapping.external_ip, mapping.external_port, mapping.internal_port,
            mapping.lease_seconds, mapping.internal_ip, mapping.protocol) == \
        (EXTERNAL, 8088, 8088, 1800, "127.0.0.1", "TCP")
    assert mapping.gateway == "PCP at 127.0.0.1"
    udp = mapper.map(8088, protocol="UDP")
    assert udp.protocol == "UDP" and udp.external_port == 8088
    assert mapper.renew(mapping).external_port == 8088
    mapper.unmap(mapping)
    asked = mapper.asked  # type: ignore[attr-defined]
    maps = [a for a in asked if a[1] == 1]
    # The request: version 2, MAP, our address toward the gateway, 60 bytes.
    assert all(len(a) == 60 and a[0] == 2 and a[8:24] == _v6("127.0.0.1") for a in maps)
    tcp = [a for a in maps if a[36] == 6]
    assert len({a[24:36] for a in tcp}) == 1  # made, renewed, removed: one nonce
    assert {a[24:36] for a in maps if a[36] == 17}.isdisjoint({tcp[0][24:36]})
    assert struct.unpack(">I", tcp[-1][4:8])[0] == 0  # removed: lifetime 0
    with pytest.raises(PcpError, match="no mapping of TCP port 8088"):
        mapper.unmap(mapping)  # its nonce went with it


def test_the_nonce_is_kept_in_the_home_and_outlives_the_mapper(
        gateway: Callable[[Answer], PcpMapper], tmp_path: Path) -> None:
    """A server restarted (or another worker taking the job over) maps with the nonce the
    gateway knows: a new one would be refused until the old mapping ran out. A removal
    whose answer was lost keeps it, so it can be asked again."""
    first = gateway(honest)
    first._kept = tmp_path / "pcp.json"
    first.map(8088)
    kept = json.loads((tmp_path / "pcp.json").read_text())
    assert list(kept) == ["TCP:8088"] and len(kept["TCP:8088"]) == 24
    assert (tmp_path / "pcp.json").stat().st_mode & 0o777 == 0o600
    again = gateway(honest)
    again._kept = tmp_path / "pcp.json"
    mapping = again.map(8088)
    asked = again.asked  # type: ignore[attr-defined]
    assert asked[-1][24:36] == bytes.fromhex(kept["TCP:8088"])  # the same nonce
    silent = gateway(lambda r: [])
    silent._kept = tmp_path / "pcp.json"
    with pytest.raises(PcpError):
        silent.unmap(mapping)
    assert "TCP:8088" in json.loads((tmp_path / "pcp.json").read_text())
    gateway(honest)  # (the gateway answers again)
    again.unmap(mapping)
    assert json.loads((tmp_path / "pcp.json").read_text()) == {}
    (tmp_path / "pcp.json").write_text('{"TCP:8088": "not hex at all", "UDP:1": 5}')
    again.map(8088)  # a damaged entry: a new nonce, not a crash
    assert len(json.loads((tmp_path / "pcp.json").read_text())["TCP:8088"]) == 24


def test_no_route_to_the_gateway_is_a_pcp_error_not_a_crash() -> None:
    """The network went away (a laptop's Wi-Fi): discover says no, map says why; the
    renewal thread lives on to try again."""
    mapper = PcpMapper("203.0.113.1")
    import p2prc_core.upnp as upnp

    def unreachable(gateway: str) -> str:
        raise OSError(101, "Network is unreachable")

    original = upnp.local_address
    upnp.local_address = unreachable  # type: ignore[assignment]
    try:
        assert mapper.discover() is False
        with pytest.raises(PcpError, match="Network is unreachable"):
            mapper.map(8088)
    finally:
        upnp.local_address = original  # type: ignore[assignment]


def test_a_gateway_may_give_another_port_and_the_mapping_says_so(
        gateway: Callable[[Answer], PcpMapper]) -> None:
    mapping = gateway(lambda r: honest(r, port_offset=3)).map(8088)
    assert (mapping.internal_port, mapping.external_port) == (8088, 8091)


def test_a_nat_pmp_gateway_is_told_apart_at_once(
        gateway: Callable[[Answer], PcpMapper]) -> None:
    started = time.monotonic()
    mapper = gateway(natpmp_only)
    assert mapper.discover() is False
    with pytest.raises(NotPcp, match="speaks NAT-PMP, not PCP"):
        mapper.map(8088)
    assert time.monotonic() - started < 0.5  # no retries: it answered


def test_a_gateway_that_says_no_is_said_plainly(
        gateway: Callable[[Answer], PcpMapper]) -> None:
    def refuses(request: bytes) -> list[bytes]:
        answer = bytearray(honest(request)[0])
        answer[3] = 2  # NOT_AUTHORIZED
        return [bytes(answer)]

    with pytest.raises(PcpError, match="refused: not authorized"):
        gateway(refuses).map(8088)


def _changed(at: int, value: int) -> Answer:
    def answer(request: bytes) -> list[bytes]:
        data = bytearray(honest(request)[0])
        if at < len(data):
            data[at] = value
        return [bytes(data)]
    return answer


@pytest.mark.parametrize("lie", [
    lambda r: [honest(r)[0][:-1]],                   # one byte short
    lambda r: [honest(r)[0] + b"\0" * 4],            # an option nobody asked for
    _changed(0, 1),                                  # another version
    _changed(1, 1),                                  # no response bit
    _changed(1, 130),                                # an answer to another opcode
    _changed(24, 0xEE),                              # another nonce (a forgery)
    _changed(36, 17),                                # another protocol
    _changed(41, 0x99),                              # another internal port
    lambda r: [],                                    # silence
    lambda r: [b"junk"] * 200,                       # a flood of nothing
    lambda r: [b"\0" * 1100] * 50,                   # of the largest size
])
def test_a_map_answered_wrongly_is_no_mapping(
        gateway: Callable[[Answer], PcpMapper], lie: Answer) -> None:
    started = time.monotonic()
    with pytest.raises(PcpError, match="did not answer PCP"):
        gateway(lie).map(8088)
    assert time.monotonic() - started < 2  # three tries, then it gives up


@pytest.mark.parametrize("external", ["2001:db8::1", "::", "::ffff:0:0"])
def test_an_external_address_that_is_not_ipv4_is_refused(
        gateway: Callable[[Answer], PcpMapper], external: str) -> None:
    def answer(request: bytes) -> list[bytes]:
        data = honest(request)[0]
        if request[1] != 1:
            return [data]
        return [data[:44] + ipaddress.IPv6Address(external).packed]

    if external == "::ffff:0:0":  # IPv4-mapped, but 0.0.0.0: taken as an address, and
        mapping = gateway(answer).map(8088)  # RouterPort does not advertise it (not public)
        assert mapping.external_ip == "0.0.0.0"
        return
    with pytest.raises(PcpError, match="not to an IPv4 address"):
        gateway(answer).map(8088)


def test_answers_from_elsewhere_are_passed_over() -> None:
    """A stranger on the LAN races the gateway with an answer from another port: not
    taken, even when it guessed everything else."""
    real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    real.bind(("127.0.0.1", 0))
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                request, peer = real.recvfrom(1100)
            except OSError:
                return
            forger.sendto(honest(request, external="198.51.100.66")[0], peer)
            time.sleep(0.02)
            real.sendto(honest(request)[0], peer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        mapping = PcpMapper("127.0.0.1", timeout=0.2, port=real.getsockname()[1]).map(8088)
        assert mapping.external_ip == EXTERNAL
    finally:
        real.close()
        forger.close()


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    mapper = PcpMapper("127.0.0.1", port=9)
    for kwargs in ({"port": 0}, {"port": 70000}, {"port": 80, "external_port": 70000},
                   {"port": 80, "lease_seconds": 0}, {"port": 80, "protocol": "SCTP"}):
        with pytest.raises(ValueError):
            mapper.map(**kwargs)  # type: ignore[arg-type]


def test_find_gateway_asks_pcp_then_nat_pmp(monkeypatch: pytest.MonkeyPatch,
                                            gateway: Callable[[Answer], PcpMapper]) -> None:
    """No UPnP: PCP first; a gateway that speaks NAT-PMP only gets a NAT-PMP mapper, and
    the one whose gateway answered neither, none."""
    from p2prc_core import addresses, natpmp, pcp, upnp
    from p2prc_core.natpmp import NatPmpMapper

    port = gateway(honest).port
    monkeypatch.setattr(upnp.PortMapper, "discover", lambda self: False)
    monkeypatch.setattr(addresses, "default_gateway", lambda: "127.0.0.1")
    monkeypatch.setattr(pcp, "PORT", port)
    monkeypatch.setattr(natpmp, "PORT", port)
    monkeypatch.setattr(pcp.PcpMapper.__init__, "__defaults__", (None, 0.05, port, None))
    monkeypatch.setattr(NatPmpMapper.__init__, "__defaults__", (None, 0.05, port))
    assert isinstance(natpmp.find_gateway(), PcpMapper)
    gateway(lambda r: natpmp_only(r) if r[0] == 2 else
            [struct.pack(">BBHI4s", 0, 128, 0, 7, socket.inet_aton(EXTERNAL))])
    assert isinstance(natpmp.find_gateway(), NatPmpMapper)
    gateway(lambda r: [])
    assert natpmp.find_gateway() is None
