"""Relays, the dial-back check and the reach agent, with real servers over loopback.

A relay here is a real ``p2prc server`` with ``relay = true``; the node behind it is one
with ``use_relay = "always"`` (on loopback every node can be dialled, so "auto" would drop
the relay: a test says so). The NAT-lab tests (test_natlab.py) put the same pieces behind
real NAT.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_tls import Proxy

from conftest import LiveServer, start_server, web
from p2prc_core.client import PeerClient
from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.trust import TrustStore
from p2prc_core.wire import TrustMe

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def reach_of(server: LiveServer) -> dict[str, Any]:
    try:
        return json.loads((server.home / "reach.json").read_text())
    except (OSError, ValueError):
        return {}


def relayed(relay: LiveServer, node: LiveServer, port: int | None = None) -> Endpoint:
    return Endpoint("127.0.0.1", port or relay.port, node.node_id, False, relay.node_id)


def start_relay(tmp_path: Path, name: str, **env: str) -> LiveServer:
    return start_server(tmp_path / name, env={"P2PRC_RELAY": "true",
                                              "P2PRC_RELAY_OPEN": "true", **env})


def named(relay: LiveServer) -> str:
    """How a node names ``relay`` in its ``relays`` setting."""
    return f"{relay.node_id}@127.0.0.1:{relay.port}"


def start_behind(tmp_path: Path, name: str, *relays: str, mode: str = "always",
                 **env: str) -> LiveServer:
    return start_server(tmp_path / name, env={"P2PRC_USE_RELAY": mode,
                                              "P2PRC_RELAYS": ",".join(relays), **env})


def waits_at(relay: LiveServer, node: LiveServer) -> bool:
    return any((relay.home / "relay").glob(f"w.{node.node_id}.*"))


def home_behind_relay(tmp_path: Path, servers: list[LiveServer],
                      **relay_env: str) -> tuple[LiveServer, LiveServer, NodeIdentity]:
    """A relay, and a node "home" that trusts "me" and waits at it: (relay, home, me)."""
    relay = start_relay(tmp_path, "relay", **relay_env)
    servers.append(relay)
    me = NodeIdentity.load_or_create(tmp_path / "me")
    TrustStore(tmp_path / "home").add(me.node_id)
    home = start_behind(tmp_path, "home", named(relay))
    servers.append(home)
    wait_for(lambda: waits_at(relay, home), what="home waits at the relay")
    return relay, home, me


def test_through_a_relay_end_to_end_and_the_relay_sees_only_ciphertext(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    # Both legs, the node's and the client's, pass through a proxy that keeps every byte.
    recorder = Proxy(relay.port, None, tmp_path / "proxy", timeout=None)
    try:
        home = start_behind(tmp_path, "home", f"{relay.node_id}@127.0.0.1:{recorder.port}")
        servers.append(home)
        wait_for(lambda: waits_at(relay, home), what="home waits at the relay")
        # Home's signed record names the relay, so peers learn the way to it.
        record = web.get(home.url() + "/v1/node", timeout=5).json()
        assert record["relays"] == [f"{relay.node_id}@127.0.0.1:{recorder.port}"]

        me = NodeIdentity.load_or_create(tmp_path / "client")
        path = relayed(relay, home, recorder.port)
        with PeerClient([path], timeout=10, identity=me) as client:
            assert client.health().status == "ok"
            assert client.node()["node_id"] == home.node_id  # TLS to home itself
            assert client.whoami() == TrustMe(node_id=me.node_id, trusted=False,
                                              trust_mode="allowlist")
            assert client.download(1 << 20).bytes == 1 << 20
            assert client.upload(1 << 20).bytes == 1 << 20
        assert len(recorder.seen) > 2 << 20
        # No HTTP in the clear on the relay's links: not the client's to home (inner TLS),
        # not the relay's own routes (outer TLS).
        for plaintext in (b"HTTP/1.1", b"/v1/", b"trust/me", b"speedtest", me.node_id.encode()):
            assert plaintext not in recorder.seen, plaintext
    finally:
        recorder.close()


def test_a_relay_cannot_pose_as_the_node_behind_it(tmp_path: Path,
                                                  servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    home = start_behind(tmp_path, "home", named(relay))
    servers.append(home)
    # Dialling the relay's address while expecting home's key: the relay's own key answers.
    with pytest.raises(PeerError, match=home.node_id):
        with PeerClient([Endpoint("127.0.0.1", relay.port, home.node_id)], timeout=5) as c:
            c.health()
    # A relay that names another relay id than the one that answers is refused too.
    wrong = Endpoint("127.0.0.1", relay.port, home.node_id, False, home.node_id)
    with pytest.raises(PeerError, match=f"presented node {relay.node_id}"):
        with PeerClient([wrong], timeout=5) as c:
            c.health()


def test_relay_refuses_an_untrusted_node_and_the_node_moves_to_the_next_relay(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    closed = start_relay(tmp_path, "closed", P2PRC_RELAY_OPEN="false")
    open_ = start_relay(tmp_path, "open")
    servers += [closed, open_]
    home = start_behind(tmp_path, "home", named(closed),
                        named(open_))
    servers.append(home)
    wait_for(lambda: waits_at(open_, home), what="home moved to the open relay")
    assert reach_of(home)["relay"] == named(open_)
    assert not waits_at(closed, home)
    assert "not trusted" in home.output() or "Not relayed" in home.output()
    with PeerClient([relayed(open_, home)], timeout=10) as client:
        assert client.health().status == "ok"
    # Through the relay that refused it, home is not reachable: said in one line.
    with pytest.raises(PeerError, match="Not relayed here|does not keep a connection"):
        with PeerClient([relayed(closed, home)], timeout=10) as client:
            client.health()


def test_when_its_relay_stops_the_node_moves_to_another(tmp_path: Path,
                                                        servers: list[LiveServer]) -> None:
    first = start_relay(tmp_path, "first")
    second = start_relay(tmp_path, "second")
    servers += [first, second]
    home = start_behind(tmp_path, "home", named(first),
                        named(second))
    servers.append(home)
    wait_for(lambda: waits_at(first, home), what="home waits at the first relay")
    first.stop()
    wait_for(lambda: waits_at(second, home), timeout=30, what="home moved to the second")
    wait_for(lambda: reach_of(home).get("relay", "").startswith(second.node_id),
             what="home's record names the second relay")
    record = web.get(home.url() + "/v1/node", timeout=5).json()
    assert record["relays"] == [named(second)]
    with PeerClient([relayed(first, home), relayed(second, home)], timeout=10) as client:
        assert client.health().status == "ok"
        assert client.endpoint.relay == second.node_id
    # With no relay left, the client says which paths it tried and why.
    second.stop()
    with pytest.raises(PeerError) as failed:
        with PeerClient([relayed(first, home), relayed(second, home)], timeout=5) as client:
            client.health()
    message = str(failed.value)
    assert message.startswith("no path to this peer works")
    assert f"relay 127.0.0.1:{first.port}" in message
    assert f"relay 127.0.0.1:{second.port}" in message


def test_relay_limits_on_nodes_and_connections(tmp_path: Path,
                                               servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_MAX_NODES="1",
                        P2PRC_RELAY_MAX_CONNECTIONS="1")
    servers.append(relay)
    at = named(relay)
    home = start_behind(tmp_path, "home", at)
    servers.append(home)
    wait_for(lambda: waits_at(relay, home), what="home waits at the relay")
    # A second node: the relay is full.
    other = NodeIdentity.load_or_create(tmp_path / "other")
    with PeerClient(Endpoint("127.0.0.1", relay.port, relay.node_id), timeout=5,
                    identity=other) as client:
        with pytest.raises(PeerRefused) as full:
            client.relay_wait(1)
    assert full.value.status == 503 and "limit" in str(full.value)
    # One connection is carried; a second at once is refused, and works once the first ends.
    from p2prc_core.channel import Channel

    held = Channel(relayed(relay, home)).connect(10)
    try:
        wait_for(lambda: any((relay.home / "relay").glob("c.*")), what="a counted connection")
        with pytest.raises(PeerError, match="503|busy"):
            with PeerClient([relayed(relay, home)], timeout=5) as client:
                client.health()
    finally:
        held.close()
    wait_for(lambda: not any((relay.home / "relay").glob("c.*")), what="the count drops")
    with PeerClient([relayed(relay, home)], timeout=5) as client:
        assert client.health().status == "ok"


def test_a_node_that_is_not_a_relay_says_so(live_server: LiveServer, tmp_path: Path) -> None:
    node = start_server(tmp_path / "somebody")
    try:
        with pytest.raises(PeerError, match="Not a relay"):
            with PeerClient([relayed(live_server, node)], timeout=5) as client:
                client.health()
    finally:
        node.stop()


def test_dial_back_says_reachable_and_auto_drops_the_relay(tmp_path: Path,
                                                           servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    home = start_behind(tmp_path, "home", named(relay),
                        mode="auto")
    servers.append(home)
    state = wait_for(lambda: (reach_of(home).get("reachable") or {}).get("checked")
                     and reach_of(home), what="home was dialled back")
    assert state["reachable"]["reachable"] is True
    assert state["reachable"]["by"] == relay.node_id
    wait_for(lambda: reach_of(home).get("relay") is None and not waits_at(relay, home),
             what="auto mode drops the relay of a reachable node")
    assert "relays" not in web.get(home.url() + "/v1/node", timeout=5).json()


def test_dial_back_of_a_port_where_no_node_answers(live_server: LiveServer,
                                                   tmp_path: Path) -> None:
    me = NodeIdentity.load_or_create(tmp_path / "client")
    with socket.create_server(("127.0.0.1", 0)) as not_a_node:  # accepts, speaks no TLS
        port = not_a_node.getsockname()[1]
        with PeerClient(Endpoint("127.0.0.1", live_server.port, live_server.node_id),
                        timeout=10, identity=me) as client:
            answer = client.reach_check(port)
            assert answer.reachable is False and answer.error
            assert answer.address.endswith(f":{port}")
            # Only {"port": N} is taken: no other host can be named.
            with pytest.raises(PeerRefused) as refused:
                client.signed("POST", "/v1/reach", {"port": port, "host": "10.1.2.3"})
            assert refused.value.status == 400
            with pytest.raises(PeerRefused):
                client.signed("POST", "/v1/reach", {"port": 0})


def test_status_tells_how_the_node_is_reached(tmp_path: Path,
                                              servers: list[LiveServer]) -> None:
    import os
    import subprocess

    from conftest import P2PRC

    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    at = named(relay)
    home = start_behind(tmp_path, "home", at)
    servers.append(home)
    wait_for(lambda: (reach_of(home).get("reachable") or {}).get("checked"),
             what="home was dialled back")
    env = {**os.environ, "P2PRC_HOME": str(home.home), "P2PRC_PORT": str(home.port),
           "P2PRC_USE_RELAY": "always", "P2PRC_RELAYS": at}
    status = json.loads(subprocess.run([P2PRC, "status", "--json"], capture_output=True,
                                       text=True, env=env, timeout=60).stdout)
    reach = status["reach"]
    assert reach["relay"] == at and reach["dial_back"]["reachable"] is True
    assert reach["summary"] == "direct" and reach["use_relay"] == "always"
    table = subprocess.run([P2PRC, "status"], capture_output=True, text=True, env=env,
                           timeout=60).stdout
    assert "dialled back at 127.0.0.1" in table
    relay_status = json.loads(subprocess.run(
        [P2PRC, "status", "--json"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "P2PRC_HOME": str(relay.home), "P2PRC_RELAY": "true"}).stdout)
    assert relay_status["reach"]["relay_offered"] is True


def test_a_restarted_node_is_reached_at_once_not_through_its_old_poll(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    at = named(relay)
    home = start_behind(tmp_path, "home", at)
    wait_for(lambda: waits_at(relay, home), what="home waits at the relay")
    home.stop()
    # The relay notices the poll went away: its marker goes, long before the poll's 20 s.
    wait_for(lambda: not waits_at(relay, home), timeout=5, what="the old poll ended")
    again = start_behind(tmp_path, "home", at)
    servers.append(again)
    wait_for(lambda: waits_at(relay, again), what="the restarted home waits again")
    started = time.monotonic()
    with PeerClient([relayed(relay, again)], timeout=10) as client:
        assert client.health().status == "ok"
    assert time.monotonic() - started < 5


def test_relay_mbit_caps_each_relayed_connection(tmp_path: Path,
                                                 servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_MBIT="16")
    servers.append(relay)
    home = start_behind(tmp_path, "home", named(relay))
    servers.append(home)
    wait_for(lambda: waits_at(relay, home), what="home waits at the relay")
    with PeerClient([relayed(relay, home)], timeout=20) as client:
        capped = client.download(4 << 20)
    with PeerClient([Endpoint("127.0.0.1", home.port, home.node_id)], timeout=20) as client:
        direct = client.download(4 << 20)
    assert capped.mbit_per_second < 16 * 1.25, capped.mbit_per_second
    assert direct.mbit_per_second > 4 * capped.mbit_per_second


def test_the_ssh_helper_says_in_one_line_why_no_path_works(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import free_port

    node = NodeIdentity.generate().node_id
    relay = NodeIdentity.generate().node_id
    closed = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "p2prc_core.tunnel", "--home", str(tmp_path / "me"),
         "--node", node, "--timeout", "2", "--path", f"127.0.0.1:{closed}",
         "--path", f"relay {relay}@127.0.0.1:{closed}", "a" * 64, "22"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 255
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2prc tunnel: no path to the host works")
    assert f"127.0.0.1:{closed}" in lines[0] and "relay" in lines[0]


def test_waiting_nodes_never_take_every_thread_of_a_relay(tmp_path: Path,
                                                          servers: list[LiveServer]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # One worker with 4 threads for polls: nodes the relay does not trust (these fresh keys)
    # take at most 2 of them; the rest are kept for nodes it trusts (test_relay_limits).
    relay = start_relay(tmp_path, "relay", P2PRC_THREADS="4", P2PRC_RELAY_POLL_THREADS="4")
    servers.append(relay)
    at = Endpoint("127.0.0.1", relay.port, relay.node_id)

    def wait_as(identity: NodeIdentity) -> str:
        try:
            with PeerClient(at, timeout=5, identity=identity) as client:
                client.relay_wait(20)
            return "answered"
        except PeerRefused as err:
            return str(err.status)
        except PeerError:
            return "closed"  # the relay stopped

    nodes = [NodeIdentity.generate() for _ in range(2)]
    with ThreadPoolExecutor(4) as pool:
        holding = [pool.submit(wait_as, n) for n in nodes]
        wait_for(lambda: len(list((relay.home / "relay").glob("w.*"))) == 2,
                 what="two nodes wait")
        assert wait_as(NodeIdentity.generate()) == "503"  # no third: threads are kept
        started = time.monotonic()
        assert web.get(relay.url() + "/v1/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2  # the relay still answers everything else
        relay.stop()  # ends the polls
        assert {f.result(timeout=30) for f in holding} <= {"answered", "closed"}


def test_one_node_holds_at_most_two_polls(tmp_path: Path) -> None:
    from p2prc_core.relayhub import RelayHub, RelayRefusal

    hub = RelayHub(tmp_path, max_nodes=4, max_connections=4)
    node = NodeIdentity.generate().node_id
    ready = threading.Barrier(3)

    def poll() -> None:
        ready.wait()
        hub.wait(node, seconds=3)

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for thread in threads:
        thread.start()
    ready.wait()
    wait_for(lambda: len(list((tmp_path / "relay").glob(f"w.{node}.*"))) == 2,
             what="two polls")
    with pytest.raises(RelayRefusal) as refused:
        hub.wait(node, seconds=1)
    assert refused.value.status == 429
    for thread in threads:
        thread.join(10)


class TokenFlood(http.server.BaseHTTPRequestHandler):
    """A hostile relay: a listening node hears of a new client all the time, every poll
    gets a token at once, every accept a 101 that then holds the connection open."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        # It answers the health check as any server does (a node checks a relay's ladder
        # with it before it waits there), then floods every poll.
        answer = {"status": "ok"} if self.path.startswith("/v1/health") else \
            {"token": os.urandom(16).hex()}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: p2prc-stream/1\r\n\r\n")
        self.wfile.flush()
        if self.path.startswith("/v1/relay/listen"):
            with contextlib.suppress(OSError):
                for _ in range(3000):
                    self.wfile.write(json.dumps({"token": os.urandom(16).hex()}).encode()
                                     + b"\n")
                    self.wfile.flush()
                    time.sleep(0.01)
        else:
            time.sleep(30)
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


def test_a_relay_that_floods_tokens_cannot_exhaust_the_node(tmp_path: Path,
                                                            servers: list[LiveServer]) -> None:
    import psutil

    from conftest import serve_tls

    liar = NodeIdentity.generate()
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenFlood)
    fake.daemon_threads = True
    serve_tls(fake, liar, tmp_path / "liar")
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        home = start_behind(tmp_path, "home", f"{liar.node_id}@127.0.0.1:"
                                              f"{fake.server_address[1]}")
        servers.append(home)
        wait_for(lambda: "one left waiting" in home.output(), what="the cap is reached")
        processes = [psutil.Process(home.proc.pid), *psutil.Process(home.proc.pid).children()]
        assert sum(p.num_threads() for p in processes) < 100
        started = time.monotonic()
        assert web.get(home.url() + "/v1/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
    finally:
        fake.shutdown()
        fake.server_close()


def test_no_dial_back_for_a_request_from_this_machine(tmp_path: Path,
                                                      servers: list[LiveServer]) -> None:
    # As a request through a relay arrives: from the node's own loopback.
    node = start_server(tmp_path / "node", env={"P2PRC_ALLOW_LOOPBACK": "false"})
    servers.append(node)
    me = NodeIdentity.generate()
    with PeerClient(Endpoint("127.0.0.1", node.port, node.node_id), timeout=5,
                    identity=me) as client:
        with pytest.raises(PeerRefused) as refused:
            client.reach_check(22)
    assert refused.value.status == 403 and "nothing to dial back" in str(refused.value)


def test_markers_of_a_killed_relay_are_cleared_when_it_starts(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    stale = tmp_path / "relay" / "relay"
    stale.mkdir(parents=True)
    for n in range(3):
        (stale / f"w.{NodeIdentity.generate().node_id}.{n:016x}").touch()
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_MAX_NODES="2")
    servers.append(relay)
    assert not any(stale.glob("w.*"))
    home = start_behind(tmp_path, "home", named(relay))
    servers.append(home)
    wait_for(lambda: waits_at(relay, home), what="a node waits: the relay is not 'full'")


def test_relayed_clients_held_open_take_no_thread_of_the_node(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    """Kept SSH sessions through a relay are relayed clients that last. Twelve held open
    at once, twice what a one-worker node carried (one thread each, six at most, the next
    left waiting for a 504): each is answered, the node's threads do not grow with them,
    and one more still gets through."""
    import psutil

    relay, home, me = home_behind_relay(tmp_path, servers, P2PRC_RELAY_STREAMS_PER_KEY="32",
                                        P2PRC_RELAY_STREAMS_PER_NETWORK="32")
    process = psutil.Process(home.proc.pid)

    def threads() -> int:
        return sum(p.num_threads() for p in [process, *process.children(recursive=True)])

    before = threads()
    held = [PeerClient([relayed(relay, home)], timeout=15, identity=me) for _ in range(12)]
    try:
        for client in held:
            assert client.whoami().trusted is True  # each keeps its connection open
        assert threads() <= before + 3, (before, threads())
        with PeerClient([relayed(relay, home)], timeout=15, identity=me) as one_more:
            assert one_more.whoami().trusted is True
    finally:
        for client in held:
            client.close()
