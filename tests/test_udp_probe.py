"""UDP at the p2prc port (issue 24, its first step): a node learns where its UDP comes from, as
peers see it, and so what its NAT does with UDP. The probe and answer are tried as a stranger
would send them; a real server answers on loopback; and in the NAT lab, behind a plain home
router, a symmetric one and one that drops UDP, ``p2prc doctor`` and ``status`` say which."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import P2PRC, LiveServer, require, start_server
from p2prc_core import udp_probe
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.udp_probe import (
    ANSWER_SIZE,
    PROBE_SIZE,
    Answer,
    Probe,
    ProbeError,
    Responder,
    Seen,
    _accepted,
    ask,
    classify,
)

HOST, PROBER, STRANGER = NodeIdentity.generate(), NodeIdentity.generate(), \
    NodeIdentity.generate()
NOW = 1_800_000_000


def probe_for(target: str, prober: NodeIdentity = PROBER, at: int = NOW,
              nonce: bytes = b"n" * 16) -> bytes:
    return Probe(target, prober.public_key, at, nonce).signed(prober)


def responder() -> Responder:
    return Responder(HOST, window=300)


def answer_probes(sock: socket.socket, answering: Responder) -> None:
    """A host's UDP socket reduced to its probes (``udp_endpoint`` does this and more)."""
    while True:
        try:
            data, peer = sock.recvfrom(PROBE_SIZE + 1)
        except OSError:
            return  # closed: the test is over
        answer = answering.answer(data, peer[0], peer[1], time.time())
        if answer is not None:
            sock.sendto(answer, peer)


# -- the messages ------------------------------------------------------------------------------

def test_a_probe_and_its_answer_read_back_and_the_answer_is_smaller() -> None:
    data = probe_for(HOST.node_id)
    assert len(data) == PROBE_SIZE
    assert Probe.read(data) == Probe(HOST.node_id, PROBER.public_key, NOW, b"n" * 16)
    answer = responder().answer(data, "::ffff:192.0.2.7", 40123, NOW)
    assert answer is not None and len(answer) == ANSWER_SIZE < PROBE_SIZE
    assert Answer.read(answer) == Answer(b"n" * 16, "192.0.2.7", 40123, HOST.public_key)
    six = responder().answer(data, "2001:db8::9", 5, NOW)
    assert six is not None and Answer.read(six).address == "2001:db8::9"


def changed(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("make,why", [
    (lambda: probe_for(HOST.node_id)[:-1], "one byte short"),
    (lambda: probe_for(HOST.node_id) + b"\0", "one byte long"),
    (lambda: probe_for(HOST.node_id) * 5, "five probes in one (an amplifier's wish)"),
    (lambda: b"P2U0" + probe_for(HOST.node_id)[4:], "another protocol"),
    (lambda: changed(probe_for(HOST.node_id), 4), "an answer's kind"),
    (lambda: changed(probe_for(HOST.node_id), 100), "padding that is not zeros"),
    (lambda: changed(probe_for(HOST.node_id), 190), "a broken signature"),
    (lambda: changed(probe_for(HOST.node_id), 40), "another key than the one that signed"),
    (lambda: changed(probe_for(HOST.node_id), 65), "a changed time"),
    (lambda: probe_for(STRANGER.node_id), "signed for another node"),
    (lambda: probe_for(HOST.node_id, at=NOW - 301), "from before the clock window"),
    (lambda: probe_for(HOST.node_id, at=NOW + 301), "from after the clock window"),
    (lambda: b"", "nothing"),
])
def test_a_host_answers_nothing_but_a_whole_signed_probe_for_it(make: Callable[[], bytes],
                                                                why: str) -> None:
    assert responder().answer(make(), "192.0.2.7", 40123, NOW) is None, why


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * PROBE_SIZE))
def test_random_bytes_are_never_answered(data: bytes) -> None:
    assert responder().answer(data, "192.0.2.7", 1, NOW) is None


def test_the_rate_holds_however_many_other_sources_probe() -> None:
    host = responder()
    data = probe_for(HOST.node_id)
    assert all(host.answer(data, "192.0.2.7", 1, NOW) is not None for _ in range(10))
    for i in range(5000):  # spoofed sources, the same second
        host.answer(data, f"10.{i >> 8 & 255}.{i & 255}.1", 1, NOW)
    assert host.answer(data, "192.0.2.7", 1, NOW) is None


def test_a_worker_checks_at_most_its_budget_of_signatures_a_second() -> None:
    host = responder()
    data = probe_for(HOST.node_id)
    answered = sum(host.answer(data, f"10.0.{i >> 8}.{i & 255}", 1, NOW) is not None
                   for i in range(400))
    assert answered == 200
    assert host.answer(data, "10.9.9.9", 1, NOW + 1) is not None  # the next second


def test_one_source_gets_at_most_the_rate_and_others_are_still_answered() -> None:
    host = responder()
    answered = [host.answer(probe_for(HOST.node_id), "192.0.2.7", 1000 + i, NOW)
                for i in range(15)]
    assert sum(a is not None for a in answered) == 10
    # An IPv6 /64 is one source, whatever its last 64 bits; the next second, a new count.
    six = [host.answer(probe_for(HOST.node_id), f"2001:db8::{i:x}", 1, NOW) for i in range(15)]
    assert sum(a is not None for a in six) == 10
    assert host.answer(probe_for(HOST.node_id), "192.0.2.8", 1, NOW) is not None
    assert host.answer(probe_for(HOST.node_id), "192.0.2.7", 1, NOW + 1) is not None


def test_the_prober_takes_only_the_answer_it_asked_for() -> None:
    nonce = b"m" * 16
    sent = (HOST.node_id, nonce, b"")
    good = Answer(nonce, "198.51.100.4", 3333, HOST.public_key).signed(HOST)
    assert _accepted(good, [sent]) == (Seen(HOST.node_id, "198.51.100.4", 3333), sent)
    assert _accepted(good, []) is None  # from where no probe went
    stale = Answer(b"x" * 16, "198.51.100.4", 3333, HOST.public_key).signed(HOST)
    assert _accepted(stale, [sent]) is None  # another nonce
    forged = Answer(nonce, "198.51.100.4", 3333, STRANGER.public_key).signed(STRANGER)
    assert _accepted(forged, [sent]) is None  # another node
    assert _accepted(changed(good, 30), [sent]) is None
    assert _accepted(good + b"\0", [sent]) is None
    with pytest.raises(ProbeError):
        Answer.read(changed(good, 100))


def test_answers_from_another_address_than_the_one_probed_are_not_taken() -> None:
    """A stranger answers in the peer's name from its own address: ``ask`` waits on."""
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.2", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))  # probed, never answers

    def forge() -> None:
        try:
            data, prober = peer.recvfrom(PROBE_SIZE)
        except OSError:
            return
        nonce = Probe.read(data).nonce
        stranger.sendto(Answer(nonce, "6.6.6.6", 1, HOST.public_key).signed(HOST), prober)

    threading.Thread(target=forge, daemon=True).start()
    try:
        _, seen = ask([("127.0.0.1", peer.getsockname()[1], HOST.node_id)], PROBER,
                      timeout=0.8)
    finally:
        peer.close()
        stranger.close()
    assert seen == []


def test_two_records_naming_one_address_do_not_hide_the_node_that_lives_there() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    threading.Thread(target=answer_probes, args=(sock, Responder(HOST, window=60)),
                     daemon=True).start()
    port = sock.getsockname()[1]
    liar = NodeIdentity.generate().node_id  # its record names HOST's address as its own
    try:
        _, seen = ask([("127.0.0.1", port, HOST.node_id), ("127.0.0.1", port, liar)],
                      PROBER, timeout=1.0)
    finally:
        sock.close()
    assert [s.node_id for s in seen] == [HOST.node_id]


def test_no_ipv6_in_the_kernel_the_udp_socket_is_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_six(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(udp_probe.socket, "socket", no_six)
    sock = udp_probe.bind("::", 0)  # the TCP socket fell back to 0.0.0.0 the same way
    assert sock is not None and sock.family == socket.AF_INET
    sock.close()


def test_the_doctor_probes_a_peer_where_it_answered_last(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A peer behind NAT lists its LAN address first; it answered at its router's."""
    from p2prc_core import doctor

    peer = NodeIdentity.generate().node_id
    entry = SimpleNamespace(node_id=peer, measured=SimpleNamespace(
        last_seen=NOW, address="198.51.100.7:8088"))
    ladder = [Endpoint("192.168.1.10", 8088, peer), Endpoint("198.51.100.7", 8088, peer)]
    peers = SimpleNamespace(entries=lambda: {peer: entry}, endpoints=lambda e: ladder)
    asked: list[tuple[str, int, str]] = []

    def recorded(targets: list[tuple[str, int, str]], identity: Any) -> tuple[int, list[Seen]]:
        asked.extend(targets)
        return 40000, []

    monkeypatch.setattr(udp_probe, "ask", recorded)
    doctor.udp_mapping(SimpleNamespace(peers=peers, identity=HOST, home=tmp_path))  # type: ignore[arg-type]
    assert asked == [("198.51.100.7", 8088, peer)]


@pytest.mark.parametrize("asked,seen,kind", [
    (0, [], "unknown"),
    (2, [], "blocked"),
    (2, [Seen("a", "10.0.0.5", 4000)], "none"),
    (2, [Seen("a", "11.0.0.1", 4000)], "unknown"),
    (2, [Seen("a", "10.0.0.5", 4000), Seen("b", "10.0.0.5", 4000)], "none"),
    (2, [Seen("a", "11.0.0.1", 4000), Seen("b", "11.0.0.1", 4000)], "endpoint-independent"),
    (2, [Seen("a", "11.0.0.1", 4000), Seen("b", "11.0.0.1", 61234)], "symmetric"),
    (3, [Seen("a", "11.0.0.1", 4000), Seen("b", "11.0.0.2", 4000)], "symmetric"),
    # No NAT, two addresses of this machine's own (each peer's route leaves by another).
    (2, [Seen("a", "10.0.0.5", 4000), Seen("b", "10.0.0.6", 4000)], "none"),
    # A peer on this network sees this machine's address; two beyond it, one mapping.
    (3, [Seen("lan", "10.0.0.5", 4000), Seen("a", "11.0.0.1", 4000),
         Seen("b", "11.0.0.1", 4000)], "endpoint-independent"),
    # One of three lies (or is routed otherwise): most agree.
    (3, [Seen("a", "11.0.0.1", 4000), Seen("b", "11.0.0.1", 4000),
         Seen("liar", "11.0.0.1", 9)], "endpoint-independent"),
])
def test_what_the_peers_saw_says_what_the_nat_does(asked: int, seen: list[Seen],
                                                   kind: str) -> None:
    assert classify({"10.0.0.5", "10.0.0.6", "127.0.0.1"}, 4000, asked, seen).kind == kind


# -- a real server on loopback ---------------------------------------------------------------

@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    first = start_server(tmp_path / "one")
    try:
        second = start_server(tmp_path / "two")
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_server_answers_at_its_port_what_it_saw(
        two_servers: tuple[LiveServer, LiveServer]) -> None:
    server, _ = two_servers
    port, seen = ask([("127.0.0.1", server.port, server.node_id)], PROBER)
    assert seen == [Seen(server.node_id, "127.0.0.1", port)]
    # Asked as another node than the one there: no answer, and no harm done.
    _, none = ask([("127.0.0.1", server.port, STRANGER.node_id)], PROBER, timeout=0.6)
    assert none == []


def udp_taken_and_server(home: Path) -> tuple[socket.socket, LiveServer]:
    """A UDP socket on some port, and a server started on that port (TCP); another port is
    tried where TCP's of that number is in use."""
    for _ in range(10):
        taken = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
        try:
            return taken, start_server(home, port=taken.getsockname()[1])
        except RuntimeError:
            taken.close()
    raise AssertionError("no port free for both UDP and TCP in 10 tries")


def test_a_server_whose_udp_port_is_taken_still_serves_and_says_why(tmp_path: Path) -> None:
    taken, server = udp_taken_and_server(tmp_path / "host")
    port = server.port
    try:
        assert f"UDP port {port} is taken" in server.output()
        assert ask([("127.0.0.1", port, server.node_id)], PROBER, timeout=0.5)[1] == []
    finally:
        server.stop()
        taken.close()


def p2prc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PRC_")}
    env.update(P2PRC_HOME=str(home), P2PRC_ALLOW_LOOPBACK="true")
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_doctor_and_status_say_no_nat_on_loopback(
        tmp_path: Path, two_servers: tuple[LiveServer, LiveServer]) -> None:
    me = tmp_path / "me"
    for server in two_servers:
        assert p2prc(me, "peers", "add", server.peer()).returncode == 0
    assert json.loads(p2prc(me, "status", "--json").stdout)["reach"]["udp"] is None
    checks = {c["name"]: c for c in json.loads(p2prc(me, "doctor", "--json").stdout)}
    assert checks["UDP"]["result"] == "ok" and "no NAT" in checks["UDP"]["detail"]
    udp = json.loads(p2prc(me, "status", "--json").stdout)["reach"]["udp"]
    assert udp["kind"] == "none" and len(udp["seen"]) == 2
    assert "UDP" in p2prc(me, "status").stdout


def test_a_server_that_refreshes_its_table_checks_udp_by_itself(
        tmp_path: Path, two_servers: tuple[LiveServer, LiveServer]) -> None:
    home = tmp_path / "refreshing"
    for server in two_servers:
        assert p2prc(home, "peers", "add", server.peer()).returncode == 0
    server = start_server(home, env={"P2PRC_REFRESH_SECONDS": "3600"})
    try:
        deadline = time.monotonic() + 30
        while True:
            udp = json.loads(p2prc(home, "status", "--json").stdout)["reach"]["udp"]
            if udp is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.stop()
    assert udp is not None and udp["kind"] == "none", udp
    assert {s["node_id"] for s in udp["seen"]} == {s.node_id for s in two_servers}


def test_a_reach_file_written_by_hand_is_not_shown_as_a_finding(tmp_path: Path) -> None:
    me = tmp_path / "me"
    me.mkdir()
    (me / "reach.json").write_text(json.dumps({"udp": {"kind": "\x1b[31mred", "detail": 5}}))
    done = p2prc(me, "status", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["reach"]["udp"] is None


# -- the NAT lab ---------------------------------------------------------------------------------

@pytest.mark.netns
@pytest.mark.integration
@pytest.mark.parametrize("nat,kind,result", [
    ("cone", "endpoint-independent", "ok"),
    ("symmetric", "symmetric", "warn"),
    ("udp-dropped", "blocked", "warn"),
])
def test_behind_each_kind_of_router_doctor_says_what_it_does(tmp_path: Path, nat: str,
                                                            kind: str, result: str) -> None:
    from natlab import NatLab, missing
    from netlab import available

    reason = available() or missing()
    require(reason is None, reason or "")
    lab = NatLab(tmp_path / "lab", nat=nat)
    try:
        publics = [lab.add_internet_host(name) for name in ("alpha", "beta")]
        for public in publics:
            public.serve(port=8088)
        for public in publics:
            lab.wait_listening(public, 8088)
            added = lab.home.p2prc("peers", "add", f"{public.ipv4}:8088")
            assert added.returncode == 0, added.stderr
        started = time.monotonic()
        done = lab.home.p2prc("doctor", "--json")
        took = time.monotonic() - started
        checks = {c["name"]: c for c in json.loads(done.stdout)}
        assert checks["UDP"]["result"] == result, checks["UDP"]
        udp = json.loads(lab.home.p2prc("status", "--json").stdout)["reach"]["udp"]
        assert udp["kind"] == kind, udp
        if kind != "blocked":  # the router's address, never the home's own
            assert {s["address"] for s in udp["seen"]} == {lab.router_external_ip}
        print(f"\n{nat}: {kind} ({udp['detail']}); doctor took {took:.1f} s")
    finally:
        lab.close()
