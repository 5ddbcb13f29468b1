"""Nodes that wait at a relay on one stream each (``POST /v1/relay/listen``), held by one
loop thread per worker: real relay servers over loopback, real TLS, signed requests."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil
import pytest
from test_reach import (
    home_behind_relay,
    relayed,
    start_relay,
    wait_for,
)
from test_relay_limits import answer_of, send

from conftest import LiveServer
from p2prc_core.client import PeerClient
from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.relay_client import Tokens, open_accept, open_listen
from p2prc_core.trust import TrustStore

pytestmark = pytest.mark.integration


def endpoint(relay: LiveServer) -> Endpoint:
    return Endpoint("127.0.0.1", relay.port, relay.node_id)


def threads_of(server: LiveServer) -> int:
    """Threads of the server's processes (gunicorn's master and its workers)."""
    process = psutil.Process(server.proc.pid)
    return sum(p.num_threads() for p in [process, *process.children(recursive=True)])


def test_a_node_behind_a_relay_listens_and_its_clients_get_through(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    relay, home, me = home_behind_relay(tmp_path, servers)
    markers = set((relay.home / "relay").glob(f"w.{home.node_id}.*"))
    for _ in range(5):
        with PeerClient([relayed(relay, home)], timeout=10, identity=me) as client:
            assert client.whoami().trusted is True
    # One stream the whole time: a poll would have made a new place after each client.
    assert set((relay.home / "relay").glob(f"w.{home.node_id}.*")) == markers


def test_three_hundred_listening_nodes_hold_no_thread_each_and_each_hears_its_client(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_POLLS_PER_NETWORK="1000",
                        P2PRC_WORKERS="2")
    servers.append(relay)
    before = threads_of(relay)
    nodes = [NodeIdentity.generate() for _ in range(300)]
    listening: list[Tokens] = []
    try:
        for node in nodes:
            listening.append(open_listen(endpoint(relay), node, True, 10))
        wait_for(lambda: len(list((relay.home / "relay").glob("w.*"))) == len(nodes),
                 what="every node has its place")
        assert threads_of(relay) < before + 20, (before, threads_of(relay))
        # Clients for a few of them: each node hears its own token, and accepts it.
        for index in (0, 150, 299):
            client = send(relay, "POST", "/v1/relay/connect",
                          f"node={nodes[index].node_id}", "127.0.0.1", NodeIdentity.generate(),
                          upgrade=True)
            token = None
            deadline = time.monotonic() + 15
            while token is None and time.monotonic() < deadline:
                token = listening[index].next(1.0)
            assert token is not None
            node_side = open_accept(endpoint(relay), token, nodes[index], True, 10)
            assert answer_of(client).status == 101
            client.sendall(b"from the client")
            node_side.settimeout(10)
            assert node_side.recv(100) == b"from the client"
            node_side.sendall(b"from the node")
            client.settimeout(10)
            assert client.recv(100) == b"from the node"
            client.close()
            node_side.close()
        # A node that hears nothing still hears the relay's keepalive: it is not silent.
        quiet = listening[42]
        heard = quiet.heard
        assert quiet.next(20.0) is None and quiet.heard > heard
    finally:
        for tokens in listening:
            tokens.close()
    # The nodes went: their places go too.
    wait_for(lambda: not list((relay.home / "relay").glob("w.*")), timeout=30,
             what="the places of the nodes that went are given up")


def test_a_listen_is_refused_for_what_a_poll_is_refused_for(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_OPEN="false")
    servers.append(relay)
    trusted = NodeIdentity.generate()
    TrustStore(relay.home).add(trusted.node_id)
    stranger = NodeIdentity.generate()
    unsigned = send(relay, "POST", "/v1/relay/listen", "", "127.0.0.1", None, upgrade=True)
    assert answer_of(unsigned).status == 401
    plain = send(relay, "POST", "/v1/relay/listen", "", "127.0.0.1", trusted)
    assert answer_of(plain).status == 400  # not an upgrade
    with pytest.raises(PeerRefused) as refused:
        open_listen(endpoint(relay), stranger, True, 10)
    assert refused.value.status == 403 and "trust" in str(refused.value)
    first = open_listen(endpoint(relay), trusted, True, 10)
    second = open_listen(endpoint(relay), trusted, True, 10)
    with pytest.raises(PeerRefused) as third:
        open_listen(endpoint(relay), trusted, True, 10)
    assert third.value.status == 429
    first.close()
    second.close()


@pytest.mark.parametrize(("status", "polls"), [(404, True), (405, True), (403, False),
                                               (503, False)])
def test_a_relay_without_the_listen_route_is_polled_and_a_refusal_is_a_failure(
        monkeypatch: pytest.MonkeyPatch, status: int, polls: bool) -> None:
    """A relay of an earlier version answers 404 (or 405) to a listen: the node polls it, as
    before (``_listen`` says False); any other refusal counts as the relay's failure."""
    from types import SimpleNamespace

    from p2prc_core import reach

    def refused(*_: object) -> Tokens:
        raise PeerRefused(f"relay refused ({status})", status)

    monkeypatch.setattr(reach, "open_listen", refused)
    agent = SimpleNamespace(identity=NodeIdentity.generate(), peers=SimpleNamespace(secure=True),
                            settings=SimpleNamespace(request_timeout=1))
    relay = Endpoint("127.0.0.1", 1, NodeIdentity.generate().node_id)
    if polls:
        assert reach.ReachAgent._listen(agent, relay, time.monotonic() + 5) is False  # type: ignore[arg-type]
    else:
        with pytest.raises(PeerRefused):
            reach.ReachAgent._listen(agent, relay, time.monotonic() + 5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("sent", "words"), [
    (b"not json\n", "not a client's token"),
    (b'{"token": "short"}\n', "not a client's token"),
    (b"x" * 2000, "over 1024 bytes"),
    (b"\n" * 200, "empty lines without end"),
    (b"", "closed the listening stream"),
])
def test_what_a_relay_sends_on_a_listening_stream_is_a_token_or_an_error(
        sent: bytes, words: str) -> None:
    ours, relays = socket.socketpair()
    tokens = Tokens(ours, b"", "relay x")
    if sent:
        relays.sendall(sent)
    else:
        relays.close()
    with pytest.raises(PeerError, match=words):
        tokens.next(5.0)
    ours.close()


def test_the_places_of_a_killed_worker_do_not_keep_its_nodes_out(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    """A worker killed (out of memory, say) leaves its nodes' markers behind: the next
    listen forgets them, and a node that waited there twice is let in again."""
    import signal

    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    node = NodeIdentity.generate()
    first, second = (open_listen(endpoint(relay), node, True, 10) for _ in range(2))
    worker = psutil.Process(relay.proc.pid).children()[0]
    worker.send_signal(signal.SIGKILL)
    wait_for(lambda: any(c.pid != worker.pid for c in psutil.Process(relay.proc.pid)
                         .children()), what="the master starts another worker")
    third = wait_for(lambda: _listen_or_none(relay, node), timeout=30,
                     what="the node listens again")
    assert len(list((relay.home / "relay").glob(f"w.{node.node_id}.*"))) == 1
    for tokens in (first, second, third):
        tokens.close()


def _listen_or_none(relay: LiveServer, node: NodeIdentity) -> Tokens | None:
    try:
        return open_listen(endpoint(relay), node, True, 10)
    except PeerError:
        return None


def test_a_worker_that_stops_gives_up_its_nodes_places(tmp_path: Path,
                                                      servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    listening = [open_listen(endpoint(relay), NodeIdentity.generate(), True, 10)
                 for _ in range(3)]
    assert len(list((relay.home / "relay").glob("w.*"))) == 3
    relay.stop()
    assert not list((relay.home / "relay").glob("w.*"))
    for tokens in listening:
        with pytest.raises(PeerError):
            tokens.next(10.0)
        tokens.close()


def _token_of(tokens: Tokens) -> str:
    token = None
    deadline = time.monotonic() + 15
    while token is None and time.monotonic() < deadline:
        token = tokens.next(1.0)
    assert token is not None
    return token


def test_a_token_lost_with_a_nodes_stream_is_handed_to_its_next_stream(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    """The node's process is killed after the relay wrote a client's token to its stream,
    before it came to accept (a host's worker killed, say). The relay hands the same token
    to the node's next stream, and the client gets through: no 504 after 10 s. Without a
    next stream the client hears at once (within a few seconds) that the node is gone."""
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    node = NodeIdentity.generate()
    first = open_listen(endpoint(relay), node, True, 10)
    client = send(relay, "POST", "/v1/relay/connect", f"node={node.node_id}", "127.0.0.1",
                  NodeIdentity.generate(), upgrade=True)
    token = _token_of(first)
    first.close()  # the token goes with it, as with a killed process
    again = open_listen(endpoint(relay), node, True, 10)
    assert _token_of(again) == token  # the same client, handed over
    node_side = open_accept(endpoint(relay), token, node, True, 10)
    assert answer_of(client).status == 101
    client.sendall(b"through")
    node_side.settimeout(10)
    assert node_side.recv(100) == b"through"
    client.close()
    node_side.close()

    # No next stream: a 404 that says so, well before the 10 s of a node that never came.
    started = time.monotonic()
    client = send(relay, "POST", "/v1/relay/connect", f"node={node.node_id}", "127.0.0.1",
                  NodeIdentity.generate(), upgrade=True)
    _token_of(again)
    again.close()
    answer = answer_of(client)
    assert answer.status == 404, answer
    assert "ended before it came to accept" in answer.body.decode(), answer
    assert time.monotonic() - started < 9
    client.close()


def test_a_node_that_had_the_token_still_gets_its_client_after_its_stream_ended(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    """The stream ended after the node read the token (it moved to another stream, say),
    and the node comes to accept while the relay looks for its next stream to hand the
    token again: the client is joined to it, not refused with a 404."""
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    node = NodeIdentity.generate()
    first = open_listen(endpoint(relay), node, True, 10)
    client = send(relay, "POST", "/v1/relay/connect", f"node={node.node_id}", "127.0.0.1",
                  NodeIdentity.generate(), upgrade=True)
    token = _token_of(first)
    first.close()
    wait_for(lambda: not list((relay.home / "relay").glob(f"w.{node.node_id}.*")),
             what="the relay sees the stream end")
    node_side = open_accept(endpoint(relay), token, node, True, 10)
    assert answer_of(client).status == 101
    client.sendall(b"joined")
    node_side.settimeout(10)
    assert node_side.recv(100) == b"joined"
    client.close()
    node_side.close()
