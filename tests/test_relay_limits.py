"""A relay's slots against strangers, with real servers over loopback: signed connects;
limits on relayed streams per caller key, per source network and per waiting node; budgets
of their own for relay polls, relayed streams and the host's own container tunnels; relayed
streams closed when idle.

The attacks come from other /24s of loopback (127.0.2.0/24 and up) than the trusted client
and the node behind the relay (127.0.0.1): as from another network.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from test_reach import named, relayed, start_behind, start_relay, wait_for, waits_at

from conftest import LiveServer, start_server
from p2prc_core import tls
from p2prc_core.client import PeerClient
from p2prc_core.errors import PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.signing import sign_request
from p2prc_core.trust import TrustStore
from p2prc_core.wire import ContainerRequest

pytestmark = pytest.mark.integration

TRIES = 15  # the trusted client's requests while an attack goes on


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


def send(relay: LiveServer, method: str, path: str, query: str, source: str,
         identity: NodeIdentity | None, upgrade: bool = False,
         timeout: float = 30) -> ssl.SSLSocket:
    """One request to ``relay`` from the loopback address ``source``, signed by ``identity``
    (unsigned without), as a stranger's own code would send it; the connection, kept open."""
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=timeout,
                                   source_address=(source, 0))
    sock = tls.client_context().wrap_socket(raw)
    headers = {"Host": f"127.0.0.1:{relay.port}", "Content-Length": "0"}
    if upgrade:
        headers |= {"Connection": "Upgrade", "Upgrade": "p2prc-stream/1"}
    if identity is not None:
        headers |= sign_request(identity, method, path, query, b"", relay.node_id)
    target = f"{path}?{query}" if query else path
    sock.sendall((f"{method} {target} HTTP/1.1\r\n"
                  + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
    return sock


def answer_of(sock: ssl.SSLSocket) -> Answer:
    """The answer's head and body (nothing more: after a 101 the stream follows)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    answer_headers = {k.strip().lower(): v.strip()
                      for k, v in (f.split(":", 1) for f in fields if ":" in f)}
    length = int(answer_headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), answer_headers, body)


def send_connect(relay: LiveServer, node: LiveServer, source: str,
                 identity: NodeIdentity | None) -> ssl.SSLSocket:
    return send(relay, "POST", "/v1/relay/connect", f"node={node.node_id}", source, identity,
                upgrade=True)


def connect(relay: LiveServer, node: LiveServer, source: str,
            identity: NodeIdentity | None) -> tuple[ssl.SSLSocket, Answer]:
    """A relayed stream to ``node`` asked for from ``source``: the connection, the answer."""
    sock = send_connect(relay, node, source, identity)
    return sock, answer_of(sock)


def closed_within(sock: ssl.SSLSocket, seconds: float) -> bool:
    """Whether the far end closes ``sock`` within ``seconds`` (nothing is sent on it)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


@dataclass
class Attack:
    """Threads that each keep a relayed stream or a relay poll open, and open it again as
    soon as it ends, until stopped; every answer is kept (status, and the open ones)."""

    statuses: list[int] = field(default_factory=list)
    open: set[socket.socket] = field(default_factory=set)
    asked: set[socket.socket] = field(default_factory=set)  # sent, not answered yet
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    peak: int = 0  # the most held at once

    def streams(self, relay: LiveServer, node: LiveServer, sources: list[str],
                keys: list[NodeIdentity]) -> None:
        for n, source in enumerate(sources):
            self._start(partial(send_connect, relay, node, source, keys[n % len(keys)]))

    def polls(self, relay: LiveServer, sources: list[str]) -> None:
        for source in sources:
            self._start(partial(send, relay, "GET", "/v1/relay/wait", "", source,
                                NodeIdentity.generate()))

    def _start(self, open_one: Any) -> None:
        thread = threading.Thread(target=self._hold, args=(open_one,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _hold(self, open_one: Any) -> None:
        while not self.stop.is_set():
            try:
                sock = open_one()
            except OSError:
                self.stop.wait(0.2)
                continue
            with self.lock:
                self.asked.add(sock)
            try:
                answer = answer_of(sock)
            except (OSError, ValueError, IndexError):
                sock.close()
                self.stop.wait(0.2)
                continue
            finally:
                with self.lock:
                    self.asked.discard(sock)
            holds = answer.status in (101, 200, 204)
            with self.lock:
                self.statuses.append(answer.status)
                if holds:
                    self.open.add(sock)
                    self.peak = max(self.peak, len(self.open))
            try:
                if holds and not self.stop.is_set():
                    select.select([sock], [], [], 60)  # until the far end closes
                else:
                    self.stop.wait(0.2)
            finally:
                with self.lock:
                    self.open.discard(sock)
                sock.close()

    def count(self, status: int) -> int:
        with self.lock:
            return self.statuses.count(status)

    def end(self) -> None:
        self.stop.set()
        with self.lock:
            for sock in self.open | self.asked:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def attack() -> Iterator[Attack]:
    started = Attack()
    try:
        yield started
    finally:
        started.end()


def network(third: int, count: int) -> list[str]:
    """``count`` loopback addresses of one /24, 127.0.THIRD.0/24."""
    return [f"127.0.{third}.{n}" for n in range(1, count + 1)]


def trusted_tries(relay: LiveServer, home: LiveServer, me: NodeIdentity) -> list[str]:
    """A client that ``home`` trusts asks it, through ``relay``, who it is, TRIES times,
    each on a new relayed connection; what went wrong, for each that failed."""
    failures = []
    for _ in range(TRIES):
        try:
            with PeerClient([relayed(relay, home)], timeout=10, identity=me) as client:
                assert client.whoami().trusted is True
        except PeerError as err:
            failures.append(str(err))
    return failures


def behind(tmp_path: Path, relay: LiveServer, name: str = "home") -> tuple[LiveServer,
                                                                           NodeIdentity]:
    """A node behind ``relay`` that trusts the client it returns; waiting at the relay. It
    carries up to five relayed clients at once (threads 12: its own cap is half of 10)."""
    me = NodeIdentity.load_or_create(tmp_path / f"{name}-client")
    TrustStore(tmp_path / name).add(me.node_id)
    home = start_behind(tmp_path, name, named(relay), P2PRC_THREADS="12")
    wait_for(lambda: waits_at(relay, home), what=f"{name} waits at the relay")
    return home, me


def test_a_strangers_held_streams_leave_a_trusted_client_through(
        tmp_path: Path, servers: list[LiveServer], attack: Attack) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_OPEN="false")
    servers.append(relay)
    TrustStore(relay.home).add(NodeIdentity.load_or_create(tmp_path / "home").node_id)
    home, me = behind(tmp_path, relay)
    servers.append(home)
    # A stranger (trusted by nobody) holds as many relayed streams to home as it can get,
    # from one network, with a few keys.
    attack.streams(relay, home, network(2, 8), [NodeIdentity.generate() for _ in range(4)])
    wait_for(lambda: attack.count(101) >= 2 and len(attack.statuses) >= 8,
             what="the stranger holds streams")
    failures = trusted_tries(relay, home, me)
    assert failures == [], f"{len(failures)} of {TRIES} failed: {failures[:3]}"
    # The stranger got its network's share, and was told why for the rest.
    assert attack.peak <= 4
    assert attack.count(429) > 0


def test_many_fresh_keys_polling_an_open_relay_leave_a_trusted_node_on_it(
        tmp_path: Path, servers: list[LiveServer], attack: Attack) -> None:
    relay = start_relay(tmp_path, "relay")  # relay_open: any key may wait here
    servers.append(relay)
    TrustStore(relay.home).add(NodeIdentity.load_or_create(tmp_path / "home").node_id)
    home, me = behind(tmp_path, relay)
    servers.append(home)
    attack.polls(relay, network(3, 12))
    wait_for(lambda: len([w for w in (relay.home / "relay").glob("w.*")
                          if home.node_id not in w.name]) >= 4, what="strangers wait")
    failures = trusted_tries(relay, home, me)
    assert failures == [], f"{len(failures)} of {TRIES} failed: {failures[:3]}"
    assert attack.count(429) > 0  # one network's polls are limited


def test_an_unsigned_connect_is_refused_and_says_why(tmp_path: Path,
                                                     servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay")
    servers.append(relay)
    home, _ = behind(tmp_path, relay)
    servers.append(home)
    sock, answer = connect(relay, home, "127.0.0.1", None)
    sock.close()
    assert answer.status == 401
    assert answer.json()["title"] == "Signature required"
    assert "must be signed" in answer.json()["description"]


def test_one_key_and_one_network_get_429_with_retry_after(tmp_path: Path,
                                                          servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_STREAMS_PER_KEY="2",
                        P2PRC_RELAY_STREAMS_PER_NETWORK="3")
    servers.append(relay)
    home, me = behind(tmp_path, relay)
    servers.append(home)
    held: list[ssl.SSLSocket] = []
    try:
        key = NodeIdentity.generate()
        for source in network(4, 2):
            sock, answer = connect(relay, home, source, key)
            held.append(sock)
            assert answer.status == 101
        sock, refused = connect(relay, home, "127.0.4.3", key)
        sock.close()
        assert refused.status == 429 and int(refused.headers["retry-after"]) > 0
        assert key.node_id in refused.json()["description"]
        # Another key, same network: one more, then the network's limit.
        sock, answer = connect(relay, home, "127.0.4.4", NodeIdentity.generate())
        held.append(sock)
        assert answer.status == 101
        sock, refused = connect(relay, home, "127.0.4.5", NodeIdentity.generate())
        sock.close()
        assert refused.status == 429 and int(refused.headers["retry-after"]) > 0
        assert "127.0.4.0/24" in refused.json()["description"]
        # Another network is not held back by it.
        assert trusted_tries(relay, home, me) == []
    finally:
        for sock in held:
            sock.close()
    # Once they close, the key may connect again.
    wait_for(lambda: connect(relay, home, "127.0.4.6", key)[1].status == 101,
             what="the key's streams were given back")


def test_streams_to_one_node_leave_slots_for_another(tmp_path: Path,
                                                     servers: list[LiveServer],
                                                     attack: Attack) -> None:
    # Four streams for the clients' ends in each worker: streams to one node get two.
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_STREAMS="4")
    servers.append(relay)
    busy, _ = behind(tmp_path, relay, "busy")
    quiet, me = behind(tmp_path, relay, "quiet")
    servers += [busy, quiet]
    for third in range(5, 9):  # from several networks: no network's limit is reached
        attack.streams(relay, busy, network(third, 1), [NodeIdentity.generate()])
    wait_for(lambda: attack.count(101) >= 2, what="streams to busy")
    assert trusted_tries(relay, quiet, me) == []
    assert attack.peak <= 2
    assert attack.count(503) > 0


def test_an_idle_relayed_stream_is_closed(tmp_path: Path, servers: list[LiveServer]) -> None:
    relay = start_relay(tmp_path, "relay", P2PRC_RELAY_IDLE_SECONDS="2")
    servers.append(relay)
    home, _ = behind(tmp_path, relay)
    servers.append(home)
    sock, answer = connect(relay, home, "127.0.0.1", NodeIdentity.generate())
    with sock:
        assert answer.status == 101
        started = time.monotonic()
        assert closed_within(sock, 15), "an idle relayed stream stayed open"
        assert time.monotonic() - started < 6  # the relay's 2 s, not an hour (nor the node's)


def test_relay_traffic_leaves_the_hosts_own_tunnels_their_threads(
        tmp_path: Path, servers: list[LiveServer], attack: Attack, engine: Any) -> None:
    import asyncio

    from p2prc_core.models import Endpoint
    from p2prc_core.sshkeys import ensure_key
    from p2prc_core.tunnel_streams import open_stream

    me = NodeIdentity.load_or_create(tmp_path / "me")
    TrustStore(tmp_path / "relay").add(me.node_id)
    relay = start_server(tmp_path / "relay", env={
        "P2PRC_RELAY": "true", "P2PRC_RELAY_OPEN": "true", "P2PRC_DISABLE_PLUGINS": "nvidia"})
    servers.append(relay)
    at = Endpoint("127.0.0.1", relay.port, relay.node_id)
    try:
        with PeerClient(at, timeout=60, identity=me) as client:
            container = client.create_container(ContainerRequest(ensure_key(tmp_path / "me")[1]))
        home, _ = behind(tmp_path, relay)
        servers.append(home)
        attack.polls(relay, [f"127.0.{n}.1" for n in range(10, 30)])  # many networks
        attack.streams(relay, home, [f"127.0.{n}.1" for n in range(30, 50)],
                       [NodeIdentity.generate() for _ in range(7)])
        wait_for(lambda: len(attack.statuses) >= 10, what="relay traffic")

        async def banner() -> bytes:
            reader, writer, first, _ = await open_stream(
                [at], me, f"/v1/containers/{container.id}/tunnel", "port=22", 20)
            while b"\n" not in first:
                first += await asyncio.wait_for(reader.read(64), 10)
            writer.close()
            return first

        for _ in range(3):
            assert asyncio.run(banner()).startswith(b"SSH-2.0")
    finally:
        attack.end()
        for c in engine.containers.list(all=True, filters={  # type: ignore[attr-defined]
                "label": f"org.p2prc.node={relay.node_id}"}):
            c.remove(force=True)


def test_a_relay_counts_networks_as_ipv4_24_and_ipv6_64() -> None:
    from p2prc_core.intake import source_prefix

    assert source_prefix("192.0.2.77", ipv6_bits=64) == "192.0.2.0/24"
    assert source_prefix("::ffff:192.0.2.77", ipv6_bits=64) == "192.0.2.0/24"
    assert source_prefix("2001:db8:1:2:aa::5", ipv6_bits=64) == "2001:db8:1:2::/64"
    assert source_prefix("2001:db8:1:2:aa::5") == "2001:db8:1::/48"  # the exchange's
