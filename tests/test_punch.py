"""Hole punching and QUIC on the p2prc port (issue 24), on loopback with real servers: a node
met through its relay is reached over a punched path, and a stranger cannot use the UDP
port to open a path, to amplify, or to make a host punch where it should not. (Two real NATs:
``test_punch_lab.py``.)"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reach import named, relayed, start_behind, start_relay, wait_for, waits_at

from conftest import LiveServer, start_server
from p2prc_core import punch, punched, tls
from p2prc_core.client import PeerClient
from p2prc_core.config import Settings
from p2prc_core.errors import PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.quic_link import QuicLink
from p2prc_core.server import create_app
from p2prc_core.server.punching import own_candidates
from p2prc_core.services import NodeServices
from p2prc_core.signing import sign_request
from p2prc_core.trust import TrustStore
from p2prc_core.wire import PunchOffer, WireError, decode

ME = NodeIdentity.generate()


# -- candidates and packets -------------------------------------------------------------------

def test_good_candidates_are_read_back() -> None:
    assert punch.parse_candidates(["11.0.0.2:40000", "[2001:db8::5]:8088", "10.1.2.3:1"]) == \
        [("11.0.0.2", 40000), ("2001:db8::5", 8088), ("10.1.2.3", 1)]


@pytest.mark.parametrize(("candidates", "says"), [
    (["127.0.0.1:8088"], "loopback"),
    (["[::1]:8088"], "loopback"),
    (["169.254.169.254:80"], "link-local"),  # a cloud's metadata service
    (["[fd00:ec2::254]:80"], "metadata"),
    (["[fe80::1]:80"], "link-local"),
    (["[fe80::1%eth0]:80"], "never punched"),
    (["224.0.0.1:5353"], "multicast"),
    (["255.255.255.255:9"], "broadcast"),
    (["0.0.0.0:9"], "unspecified"),
    (["[::ffff:127.0.0.1]:80"], "loopback"),  # an IPv6 spelling of loopback
    ([f"11.0.0.{i}:8088" for i in range(9)], "at most 8"),
    (["11.0.0.2:8088", "11.0.0.2:8088"], "twice"),
    (["11.0.0.2"], "ADDRESS:PORT"),
    (["11.0.0.2:0"], "ADDRESS:PORT"),
    (["11.0.0.2:65536"], "ADDRESS:PORT"),
    (["11.0.0.2:\u00b2"], "ADDRESS:PORT"),  # "²".isdigit() is true; int("²") fails
    (["11.0.0.2:\u0661\u0662"], "ADDRESS:PORT"),  # Arabic-Indic digits
    (["example.org:8088"], "not an IP address"),
    (["::1:8088"], "brackets"),
    (["[[::1]]:8088"], "never punched|not an IP"),
    (["[11.0.0.2:8088"], "brackets"),
    ([], "non-empty"),
    ("11.0.0.2:8088", "non-empty list"),
    ([8088], "ADDRESS:PORT"),
    (["1" * 70 + ":80"], "64 characters"),
])
def test_hostile_candidate_lists_are_refused_with_the_reason(candidates: Any,
                                                              says: str) -> None:
    with pytest.raises(punch.CandidateError, match=says):
        punch.parse_candidates(candidates)


def test_loopback_is_a_candidate_only_where_the_config_allows_it() -> None:
    assert punch.parse_candidates(["127.0.0.1:9"], allow_loopback=True) == [("127.0.0.1", 9)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=70), st.integers(), st.none()), max_size=12))
def test_any_candidate_list_is_taken_or_refused_never_crashes(items: list[Any]) -> None:
    try:
        found = punch.parse_candidates(items)
    except punch.CandidateError:
        return
    assert 1 <= len(found) <= punch.MAX_CANDIDATES
    assert all(0 < port < 65536 for _, port in found)


def test_a_punch_packet_is_its_token_and_nothing_else_is_one() -> None:
    token = punch.new_token()
    assert punch.token_of(punch.packet(token)) == token
    assert len(punch.packet(token)) == punch.PACKET_SIZE == 20
    assert punch.token_of(punch.packet(token) + b"x") is None
    assert punch.token_of(b"P2U1" + token) is None


@pytest.mark.parametrize("body", [
    {"token": "ab" * 16 + "\n", "candidates": ["11.0.0.2:1"]},
    {"token": "AB" * 16, "candidates": ["11.0.0.2:1"]},
    {"token": "ab" * 16, "candidates": []},
    {"token": "ab" * 16, "candidates": ["11.0.0.2:1"] * 9},
    {"token": "ab" * 16, "candidates": ["1" * 65]},
    {"token": "ab" * 16, "candidates": ["11.0.0.2:1"], "more": 1},
])
def test_an_offer_of_the_wrong_shape_is_refused_by_its_definition(body: dict[str, Any]) -> None:
    with pytest.raises(WireError):
        decode(json.dumps(body).encode(), PunchOffer)


def test_the_host_offers_where_peers_saw_it_then_its_own_addresses() -> None:
    from p2prc_core.models import Address

    state = {"reachable": {"address": "11.0.0.1:8088"},
             "udp": {"seen": [{"address": "11.0.0.1", "port": 40001},
                              {"address": "127.0.0.1", "port": 1}, "junk"]}}
    ours = own_candidates(state, [Address.parse("10.199.3.2"), Address.parse("::1"),
                                  Address.parse("127.0.0.1")], 8088, allow_loopback=False)
    assert ours == ["11.0.0.1:8088", "10.199.3.2:8088"]
    assert own_candidates({"reachable": "junk", "udp": ["junk"]}, [], 8088, False) == []
    # A stranger learns nothing of the host's own networks.
    assert own_candidates(state, [Address.parse("10.199.3.2"), Address.parse("172.17.0.1")],
                          8088, False, public_only=True) == ["11.0.0.1:8088"]
    mapped = {"udp_port": {"address": "11.0.0.1", "port": 40222}, **state}
    assert own_candidates(mapped, [], 8088, False)[0] == "11.0.0.1:40222"  # as the relay saw


# -- the route, in the app -------------------------------------------------------------------

@pytest.fixture
def app(tmp_path: Path) -> Iterator[testing.TestClient]:
    node = NodeServices(Settings(allow_loopback=False), tmp_path,
                        make_plugin_manager(disabled=["nvidia"]))
    yield testing.TestClient(create_app(node))


def offer(client: testing.TestClient, body: Any, caller: NodeIdentity = ME) -> testing.Result:
    raw = json.dumps(body).encode()
    target = _app_node(client)
    return client.simulate_post("/v1/punch", body=raw, headers={
        **sign_request(caller, "POST", "/v1/punch", "", raw, target),
        "Content-Type": "application/json"})


def _app_node(client: testing.TestClient) -> str:
    node_id: str = client.simulate_get("/v1/node").json["node_id"]
    return node_id


def test_the_route_refuses_bad_offers_and_says_why(app: testing.TestClient) -> None:
    token = "ab" * 16
    for candidates, says in [(["127.0.0.1:5"], "loopback"),
                             (["169.254.169.254:80"], "link-local"),
                             (["11.0.0.2:5"] * 9, "candidates"),
                             (["11.0.0.2:\u00b2"], "ADDRESS:PORT"),
                             # a stranger's: the host does not send into private networks
                             (["10.1.2.3:5", "192.168.1.9:5"], "public addresses only")]:
        result = offer(app, {"token": token, "candidates": candidates})
        assert result.status_code == 400, result.text
        assert says in result.json["description"]
    unsigned = app.simulate_post("/v1/punch", json={"token": token, "candidates": ["1.2.3.4:5"]})
    assert unsigned.status_code == 401


def test_without_a_udp_owner_the_route_says_so_and_a_caller_offers_a_few_times_only(
        app: testing.TestClient) -> None:
    from p2prc_core.server.punching import OFFERS_PER_CALLER

    body = {"token": "cd" * 16, "candidates": ["11.0.0.2:40000"]}
    first = offer(app, body)
    assert first.status_code == 503, first.text  # no server worker serves UDP here
    assert "relay" in first.json["description"]
    statuses = [offer(app, body).status_code for _ in range(OFFERS_PER_CALLER)]
    assert statuses == [503] * (OFFERS_PER_CALLER - 1) + [429]
    assert offer(app, body, NodeIdentity.generate()).status_code == 503  # another caller


def test_a_refusal_for_now_is_not_remembered_as_a_pair_that_cannot_punch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 429 (this caller offered often lately) says "not now": the next command tries
    again, rather than taking the relay for ten minutes."""
    from p2prc_core.errors import PeerRefused

    def busy(self: Any, endpoint: Endpoint) -> Any:
        raise PeerRefused("offered a moment ago", 429)

    monkeypatch.setattr(punched.PunchedPaths, "_punch", busy)
    paths = punched.PunchedPaths(tmp_path, ME)
    where = Endpoint("11.0.0.10", 8088, NodeIdentity.generate().node_id, False,
                     NodeIdentity.generate().node_id)
    assert paths.socket_to(where) is None and "moment ago" in paths.last_error
    assert punched.remembered(tmp_path) == {}


# -- real servers over loopback -----------------------------------------------------------------

@pytest.fixture
def host(tmp_path: Path) -> Iterator[LiveServer]:
    """A server that trusts ME (a friend may punch to private and loopback addresses)."""
    TrustStore(tmp_path / "host").add(ME.node_id, "me")
    server = start_server(tmp_path / "host")
    try:
        yield server
    finally:
        server.stop()


def agreed(server: LiveServer) -> tuple[socket.socket, tuple[str, int], bytes]:
    """A socket whose address ``server`` took an offer from and punched with: the path."""
    sock = punch.udp_socket()
    token = punch.new_token()
    with PeerClient(Endpoint("127.0.0.1", server.port, server.node_id), identity=ME) as client:
        answer = client.punch(PunchOffer(token=token.hex(),
                                         candidates=[f"127.0.0.1:{sock.getsockname()[1]}"]))
    found = punch.punch(sock, punch.parse_candidates(answer.candidates, True), token)
    assert found == (sock, ("127.0.0.1", server.port))
    return sock, found[1], token


def health_over(link: QuicLink, node_id: str) -> dict[str, Any]:
    """GET /v1/health over one of the link's streams, with TLS to the node inside it."""
    from p2prc_core.channel import Channel

    wrapped = Channel(Endpoint("127.0.0.1", 1, node_id)).wrap(link.open_socket(), 5)
    wrapped.sendall(b"GET /v1/health HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := wrapped.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    answer: dict[str, Any] = json.loads(body)
    return answer


def test_an_agreed_path_carries_streams_to_the_node_checked(host: LiveServer) -> None:
    sock, found, _ = agreed(host)
    link = QuicLink(sock, found, host.node_id)
    link.connect(5)
    try:
        for _ in range(3):  # each stream a connection of its own to the node's server
            assert health_over(link, host.node_id)["status"] == "ok"
    finally:
        link.close()


def test_streams_opened_at_once_each_reach_the_node_on_their_own(host: LiveServer) -> None:
    """Eight streams opened together (one closed at once), each its own connection: none
    shares another's stream id."""
    sock, found, _ = agreed(host)
    link = QuicLink(sock, found, host.node_id)
    link.connect(5)
    try:
        link.open_socket().close()  # a stream ended before it carried a byte
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: health_over(link, host.node_id), range(8)))
        assert [a["status"] for a in answers] == ["ok"] * 8
    finally:
        link.close()


def test_an_agreed_path_to_another_node_is_refused_before_any_stream(host: LiveServer) -> None:
    sock, found, _ = agreed(host)
    expected = NodeIdentity.generate().node_id
    with pytest.raises(tls.NodeMismatch, match=f"not {expected}"):
        QuicLink(sock, found, expected).connect(5)


def test_a_stranger_cannot_open_quic_without_an_agreed_path(host: LiveServer) -> None:
    started = time.monotonic()
    with pytest.raises(PeerError, match="did not start"):
        QuicLink(punch.udp_socket(), ("127.0.0.1", host.port), host.node_id).connect(1.5)
    assert time.monotonic() - started < 4
    # The host carries on: an agreed path still works.
    sock, found, _ = agreed(host)
    link = QuicLink(sock, found, host.node_id)
    link.connect(5)
    link.close()


def test_punch_packets_are_answered_only_for_a_live_token_and_never_larger(
        host: LiveServer) -> None:
    sock, _, token = agreed(host)
    stranger = punch.udp_socket()
    sock.settimeout(0.5)
    stranger.settimeout(0.5)
    try:
        stranger.sendto(punch.packet(punch.new_token()), ("127.0.0.1", host.port))
        stranger.sendto(b"P2H1" + b"x" * 400, ("127.0.0.1", host.port))
        stranger.sendto(b"\xc0" + b"\0" * 1300, ("127.0.0.1", host.port))  # not QUIC
        with pytest.raises(TimeoutError):
            stranger.recvfrom(2048)
        # The caller's own token: one packet of the same size back for each, at most 40.
        while True:  # what the punch itself sent back is drained first
            try:
                sock.recvfrom(2048)
            except TimeoutError:
                break
        answers = []
        for _ in range(60):
            sock.sendto(punch.packet(token), ("127.0.0.1", host.port))
        while True:
            try:
                answers.append(sock.recvfrom(2048)[0])
            except TimeoutError:
                break
        assert answers and all(a == punch.packet(token) for a in answers)
        assert len(answers) <= punch.ANSWERS_PER_TOKEN
    finally:
        sock.close()
        stranger.close()


# -- the client: a node met through its relay -----------------------------------------------------

@pytest.fixture
def behind(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    relay = start_relay(tmp_path, "relay")
    TrustStore(tmp_path / "node").add(ME.node_id, "me")
    node = start_behind(tmp_path, "node", named(relay))
    try:
        wait_for(lambda: waits_at(relay, node), what="the node waits at its relay")
        yield relay, node
    finally:
        node.stop()
        relay.stop()


def test_a_node_met_through_its_relay_is_reached_over_a_punched_path(
        tmp_path: Path, behind: tuple[LiveServer, LiveServer]) -> None:
    relay, node = behind
    paths = punched.PunchedPaths(tmp_path / "me", ME, allow_loopback=True)
    (tmp_path / "me").mkdir()
    try:
        with PeerClient([relayed(relay, node)], identity=ME, paths=paths) as client:
            assert client.health().status == "ok"
            assert client.node()["node_id"] == node.node_id
        state = punched.remembered(tmp_path / "me")[node.node_id]
        assert (state["path"], state["why"]) == ("punched", f"127.0.0.1:{node.port}")
        assert punched.punched_lately(tmp_path / "me") == {node.node_id}
        # The node's own server took the requests from loopback (its UDP side), and the
        # relay joined none of them: no connection marker was ever made there.
        assert not list((relay.home / "relay").glob("c.*"))
    finally:
        paths.close()


def test_a_failed_try_is_remembered_and_the_relay_is_used_at_once(
        tmp_path: Path, behind: tuple[LiveServer, LiveServer]) -> None:
    relay, node = behind
    home = tmp_path / "me"
    home.mkdir()
    # No loopback allowed: the node's candidates (loopback here) are refused, the try fails.
    paths = punched.PunchedPaths(home, ME, allow_loopback=False)
    with PeerClient([relayed(relay, node)], identity=ME, paths=paths) as client:
        assert client.health().status == "ok"  # through the relay
    first = punched.remembered(home)[node.node_id]
    assert first["path"] == "relay" and "loopback" in str(first["why"])
    started = time.monotonic()
    assert paths.socket_to(relayed(relay, node)) is None
    assert time.monotonic() - started < 0.1  # remembered: no second try
    assert punched.remembered(home)[node.node_id] == first


@pytest.mark.parametrize("content", ['{"x": {"path": "punched", "why": 1, "at": "now"}}',
                                     "[1, 2]", "not json", '{"x": 5}'])
def test_a_damaged_memory_file_is_read_as_empty(tmp_path: Path, content: str) -> None:
    (tmp_path / punched.STATE_FILE).write_text(content)
    assert punched.remembered(tmp_path) == {}
    assert punched.punched_lately(tmp_path) == set()
    paths = punched.PunchedPaths(tmp_path, ME)
    paths._remember("n" * 26, "relay", "why")  # what the next try finds: written afresh
    assert punched.remembered(tmp_path)["n" * 26]["path"] == "relay"


# -- what a stranger cannot do with the UDP port, and the bounds of a punched path -------------

def first_initial(where: tuple[str, int]) -> bytes:
    """A QUIC client's first Initial to ``where`` (1,200 bytes or more)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    connection = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["p2prc/1"]))
    connection.connect(where, now=time.monotonic())
    return connection.datagrams_to_send(now=time.monotonic())[0][0]


def answers(sock: socket.socket, wait: float = 0.5) -> list[bytes]:
    sock.settimeout(wait)
    got = []
    while True:
        try:
            got.append(sock.recvfrom(65536)[0])
        except TimeoutError:
            return got


def test_a_new_connection_first_gets_a_retry_smaller_than_its_initial(
        host: LiveServer) -> None:
    """A source an offer admitted may be forged (the punch packet's source is not proven):
    its first Initial gets only a Retry, so a forged one reflects fewer bytes than it
    carries, and no certificate goes to the victim."""
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import QuicPacketType, pull_quic_header

    sock, _, _ = agreed(host)
    try:
        answers(sock, 0.2)  # the punch's own packets
        initial = first_initial(("127.0.0.1", host.port))
        sock.sendto(initial, ("127.0.0.1", host.port))
        got = answers(sock)
        assert len(got) == 1 and len(got[0]) < len(initial), [len(g) for g in got]
        header = pull_quic_header(Buffer(data=got[0]), host_cid_length=8)
        assert header.packet_type == QuicPacketType.RETRY
    finally:
        sock.close()


def test_no_version_negotiation_ever_goes_out(host: LiveServer) -> None:
    """A packet of a QUIC version the host does not speak, from an admitted source or not,
    gets nothing (a Version Negotiation would go to whoever the source claims)."""
    sock, _, _ = agreed(host)
    stranger = punch.udp_socket()
    try:
        answers(sock, 0.2)
        unknown = bytearray(first_initial(("127.0.0.1", host.port)))
        unknown[1:5] = b"\x1a\x2a\x3a\x4a"  # a version nobody speaks
        for one in (sock, stranger):
            one.sendto(bytes(unknown), ("127.0.0.1", host.port))
            assert answers(one) == []
    finally:
        sock.close()
        stranger.close()


def test_one_token_admits_a_few_sources_not_the_world(host: LiveServer) -> None:
    token = punch.new_token()
    with PeerClient(Endpoint("127.0.0.1", host.port, host.node_id), identity=ME) as client:
        client.punch(PunchOffer(token=token.hex(), candidates=["127.0.0.1:9"]))
    sources = [punch.udp_socket() for _ in range(6)]
    try:
        answered = []
        for one in sources:
            one.sendto(punch.packet(token), ("127.0.0.1", host.port))
            answered.append(bool(answers(one, 0.3)))
        assert answered == [True] * 4 + [False] * 2
    finally:
        for one in sources:
            one.close()


def test_strangers_fill_at_most_half_the_offers_and_are_told_so(tmp_path: Path) -> None:
    """Keys are free: a stranger offering with many gets 429 past half of the live offers;
    a trusted caller still gets through. (A stranger is offered public addresses only: this
    host's mapping, as its relay would have seen it, is written beforehand.)"""
    TrustStore(tmp_path / "host").add(ME.node_id, "me")
    (tmp_path / "host" / "reach.json").write_text(json.dumps(
        {"udp_port": {"address": "11.0.0.1", "port": 40001, "by": "x"}}))
    host = start_server(tmp_path / "host")

    def offer_as(identity: NodeIdentity, target: str = "11.0.0.2:40000") -> int:
        with PeerClient(Endpoint("127.0.0.1", host.port, host.node_id),
                        identity=identity) as client:
            try:
                client.punch(PunchOffer(token=punch.new_token().hex(), candidates=[target]))
            except PeerError as err:
                return int(getattr(err, "status", 0))
        return 200

    from p2prc_core.udp_endpoint import MAX_OFFERS

    try:
        # One live stranger's offer toward one address: the host knocks on no door for long.
        assert offer_as(NodeIdentity.generate(), "11.0.1.1:40000") == 200
        assert offer_as(NodeIdentity.generate(), "11.0.1.1:40001") == 429
        statuses = [offer_as(NodeIdentity.generate(), f"11.0.0.{i}:40000")
                    for i in range(1, MAX_OFFERS // 2 + 2)]
        assert statuses == [200] * (MAX_OFFERS // 2 - 1) + [429, 429]
        assert offer_as(ME) == 200  # trusted
    finally:
        host.stop()


def test_a_link_holds_at_most_its_share_of_streams_to_the_server(host: LiveServer) -> None:
    """Each stream is a connection to the node's server: one link gets as many at once as
    one source would (``STREAMS_PER_LINK``); the ones past it are refused at once."""
    from p2prc_core.channel import Channel
    from p2prc_core.quic_server import STREAMS_PER_LINK

    sock, found, _ = agreed(host)
    link = QuicLink(sock, found, host.node_id)
    link.connect(5)
    held, refused = [], 0
    try:
        for _ in range(STREAMS_PER_LINK + 4):
            try:  # the TLS handshake needs the node's server at the other end
                held.append(Channel(Endpoint("127.0.0.1", 1, host.node_id)).wrap(
                    link.open_socket(), 5))
            except PeerError:
                refused += 1
        assert (len(held), refused) == (STREAMS_PER_LINK, 4)
        held.pop().close()  # one ends: there is room for one more
        wait_for(lambda: _one_more(link, host), timeout=10, what="a stream after one ended")
    finally:
        for one in held:
            one.close()
        link.close()


def _one_more(link: QuicLink, host: LiveServer) -> bool:
    try:
        health_over(link, host.node_id)
        return True
    except (PeerError, AssertionError, OSError):
        return False


def test_a_stream_nobody_reads_is_cut_not_grown() -> None:
    """aioquic grants credit as data arrives: past ``READ_AHEAD`` unread bytes a stream is
    stopped, and what comes after is dropped."""
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from p2prc_core.quic_link import READ_AHEAD, BoundedProtocol

    class Nowhere(asyncio.DatagramTransport):
        def sendto(self, data: Any, addr: Any = None) -> None:
            pass  # what the protocol sends goes nowhere: only what it keeps is looked at

    async def run() -> tuple[int, bool, bool]:
        protocol = BoundedProtocol(QuicConnection(configuration=QuicConfiguration(
            is_client=True)))
        protocol.connection_made(Nowhere())
        protocol.connect(("127.0.0.1", 9))
        reader, _ = protocol._create_stream(0)
        chunk = b"x" * (1 << 20)
        for _ in range(READ_AHEAD // len(chunk) + 8):
            protocol.quic_event_received(events.StreamDataReceived(chunk, False, 0))
        return len(reader._buffer), reader._eof, 0 in protocol.ended  # type: ignore[attr-defined]

    held, eof, ended = asyncio.run(run())
    assert held <= READ_AHEAD and eof and ended


def test_streams_of_a_link_outlive_the_garbage_collector(host: LiveServer) -> None:
    """asyncio holds tasks weakly: a stream's join must be held elsewhere, or a collection
    cuts an idle ``ssh`` over a punched path."""
    import gc

    from p2prc_core.channel import Channel

    sock, found, _ = agreed(host)
    link = QuicLink(sock, found, host.node_id)
    link.connect(5)
    try:
        held = [Channel(Endpoint("127.0.0.1", 1, host.node_id)).wrap(link.open_socket(), 5)
                for _ in range(10)]
        for _ in range(3):
            gc.collect()
        for wrapped in held:
            wrapped.sendall(b"GET /v1/health HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
            assert wrapped.recv(12) == b"HTTP/1.1 200"
            wrapped.close()
    finally:
        link.close()


def test_offers_go_only_to_a_worker_of_this_user(tmp_path: Path) -> None:
    """Another local user who takes the offer socket's name first gets nothing: the worker
    checks who listens, and the route says UDP is not served."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import require
    from p2prc_core.udp_control import control_name, send_offer

    require(os.getuid() == 0, "needs root, to run a process as another user")
    # This machine's own Python: another user may not reach the one behind the venv.
    squatter = subprocess.Popen(
        [shutil.which("python3", path="/usr/bin:/bin") or sys.executable, "-c",
         "import socket, sys, time\n"
         "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
         "s.bind(sys.argv[1].encode('latin-1').replace(b'@', b'\\0', 1)); s.listen(5)\n"
         "print('ready', flush=True)\n"
         "c, _ = s.accept(); c.settimeout(2)\n"
         "print(repr(c.recv(4096)), flush=True)\n",
         "@" + control_name(tmp_path)[1:]],
        stdout=subprocess.PIPE, text=True, user=65534)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "ready\n"
        assert send_offer(tmp_path, punch.new_token(), [("11.0.0.2", 40000)], False) is None
        said = squatter.communicate(timeout=10)[0]
        assert "11.0.0.2" not in said and "token" not in said
    finally:
        if squatter.poll() is None:
            squatter.kill()
            squatter.wait()


class BareClient:
    """A QUIC client driven by hand over plain sockets: each datagram it would send can be
    sent from any socket (what an attacker's own code does)."""

    def __init__(self, sock: socket.socket, host: tuple[str, int]):
        from aioquic.quic.connection import QuicConnection

        from p2prc_core.quic_link import configuration

        self.sock, self.host = sock, host
        self.quic = QuicConnection(configuration=configuration(True))
        self.quic.connect(host, now=time.monotonic())

    def pump(self, seconds: float, sock: socket.socket | None = None) -> int:
        """Send what is due and read answers on ``sock`` for ``seconds``; bytes received."""
        sock = sock or self.sock
        got, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            for data, _ in self.quic.datagrams_to_send(now=time.monotonic()):
                sock.sendto(data, self.host)
            sock.settimeout(0.02)
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            got += len(data)
            self.quic.receive_datagram(data, addr, now=time.monotonic())
            while self.quic.next_event() is not None:
                pass
        return got


def test_a_link_does_not_follow_its_packets_to_a_source_nobody_admitted(
        host: LiveServer) -> None:
    """QUIC moves a connection to wherever its packets come from (and challenges that
    address with more bytes than it got): here only to a source an offer admitted, so a
    forged source is never sent to, and a link cannot leave the address it was counted at."""
    sock, _, _ = agreed(host)
    answers(sock, 0.2)
    client = BareClient(sock, ("127.0.0.1", host.port))
    assert client.pump(1.0) > 0 and client.quic._handshake_complete
    elsewhere = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    elsewhere.bind(("127.0.0.2", 0))  # sent no punch packet: nobody admitted it
    try:
        client.quic.send_ping(1)
        assert client.pump(1.0, sock=elsewhere) == 0  # nothing goes there
        client.quic.send_ping(2)
        assert client.pump(1.0) > 0  # the link still answers where it was agreed
    finally:
        elsewhere.close()
        sock.close()


def test_a_stream_one_way_is_refused_and_the_host_carries_on(host: LiveServer) -> None:
    sock, _, _ = agreed(host)
    answers(sock, 0.2)
    client = BareClient(sock, ("127.0.0.1", host.port))
    try:
        assert client.pump(1.0) > 0
        for _ in range(40):  # one-way streams, past any share of streams
            one_way = client.quic.get_next_available_stream_id(is_unidirectional=True)
            client.quic.send_stream_data(one_way, b"x" * 100, end_stream=True)
        client.pump(1.0)
        assert "Exception in callback" not in host.output()
        link = QuicLink(*agreed(host)[:2], host.node_id)  # the host still takes links
        link.connect(5)
        assert health_over(link, host.node_id)["status"] == "ok"
        link.close()
    finally:
        sock.close()
