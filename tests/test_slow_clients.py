"""Strangers with slow connections, against a real server: heads dripped a byte at a time,
silent connections, bodies that stall, many connections from one address. An ordinary
request must be answered all the while, and each slow one is cut off at its deadline."""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer, require, start_server
from p2prc_core.server.front import body_length, head_end, source_of
from p2prc_core.tls import client_context

pytestmark = [pytest.mark.integration]

HEAD = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n"


def tls_connection(port: int, host: str = "127.0.0.1") -> ssl.SSLSocket:
    sock = socket.create_connection((host, port), timeout=10)
    return client_context().wrap_socket(sock)


def answered_in(server: LiveServer, limit: float) -> float:
    """Seconds an ordinary request took; fails past ``limit``."""
    started = time.monotonic()
    response = httpx.get(server.url() + "/v1/health", verify=False, timeout=limit)
    assert response.status_code == 200
    return time.monotonic() - started


class Drippers:
    """``count`` TLS connections that each send their request head one byte (one TLS record)
    every ``every`` seconds, from one thread, until stopped."""

    def __init__(self, port: int, count: int, every: float = 0.5, payload: bytes = HEAD,
                 host: str = "127.0.0.1"):
        self.conns = [tls_connection(port, host) for _ in range(count)]
        self.every, self.payload = every, payload
        self.stop = threading.Event()
        self.closed_by_server = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sent = 0
        while not self.stop.is_set() and sent < len(self.payload) - 1:  # never the last byte
            for conn in list(self.conns):
                try:
                    conn.send(self.payload[sent:sent + 1])
                except OSError:
                    self.conns.remove(conn)
                    self.closed_by_server += 1
            sent += 1
            self.stop.wait(self.every)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for conn in self.conns:
            conn.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    # Few threads, as on a small host: 2 workers x 4 threads would go to 8 slow clients.
    live = start_server(tmp_path / "host", env={"P2PRC_WORKERS": "1", "P2PRC_THREADS": "4",
                                                 "P2PRC_REQUEST_HEAD_SECONDS": "3"})
    try:
        yield live
    finally:
        live.stop()


def test_heads_dripped_a_byte_at_a_time_hold_no_thread(server: LiveServer) -> None:
    drippers = Drippers(server.port, 40, every=0.3)
    try:
        # 40 dripping connections against 4 threads: ordinary requests still go through at
        # once, again and again while the drip goes on.
        for _ in range(5):
            assert answered_in(server, 5) < 2
    finally:
        drippers.close()


def test_silent_connections_hold_no_thread(server: LiveServer) -> None:
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
              for _ in range(60)]
    try:
        assert answered_in(server, 5) < 2
    finally:
        for sock in silent:
            sock.close()


def test_a_head_past_its_deadline_is_answered_408_and_closed(server: LiveServer) -> None:
    conn = tls_connection(server.port)
    try:
        started = time.monotonic()
        conn.send(b"GET /v1/health HTTP/1.1\r\n")  # and nothing more
        conn.settimeout(10)
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
        took = time.monotonic() - started
    finally:
        conn.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["title"] == "Request too slow"
    assert 2 < took < 6  # P2PRC_REQUEST_HEAD_SECONDS=3, swept about every second


@pytest.mark.parametrize("length", [100, 200_000])  # read in the front / in a thread
def test_a_body_that_stalls_gets_408_and_one_log_line(server: LiveServer,
                                                      length: int) -> None:
    conn = tls_connection(server.port)
    try:
        conn.send(f"POST /v1/peers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode() + b"[" * min(length // 2, 70000))
        conn.settimeout(15)
        started, reply = time.monotonic(), b""
        while chunk := conn.recv(4096):
            reply += chunk
        took = time.monotonic() - started
    finally:
        conn.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"\r\nconnection: close\r\n" in reply.split(b"\r\n\r\n")[0].lower() + b"\r\n"
    # The deadline is the head's (3 s) plus what the bytes that came earned.
    assert took < 3 + length / 65536 + 3
    assert "Traceback" not in server.output()
    assert answered_in(server, 5) < 2


def test_one_source_holds_a_bounded_number_of_connections(tmp_path: Path) -> None:
    from netlab import NetLab, available

    reason = available()
    require(reason is None, reason or "")
    lab = NetLab(tmp_path / "lab")
    live = start_server(tmp_path / "host", env={"P2PRC_WORKERS": "1",
                                                 "P2PRC_CONNECTIONS_PER_SOURCE": "8"})
    try:
        stranger, neighbour = lab.add_host("stranger"), lab.add_host("neighbour")
        address = f"{lab.v4_prefix}.1"
        # The stranger opens 12 silent connections: 8 are kept, the rest closed at once.
        script = (
            "import socket, select, sys, time\n"
            f"conns = [socket.create_connection(('{address}', {live.port}), 5) "
            "for _ in range(12)]\n"
            "closed, ends = set(), time.monotonic() + 10\n"
            "while len(closed) < 4 and time.monotonic() < ends:\n"  # until the cap shows
            "    for c in select.select([c for c in conns if c not in closed], [], [], 0.2)[0]:\n"
            "        if c.recv(1) == b'':\n"
            "            closed.add(c)\n"
            "print(len(closed), flush=True)\n"
            "sys.stdin.read()\n")
        import subprocess

        holder = subprocess.Popen(stranger.command("python3", "-c", script),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            closed = holder.stdout.readline().strip()
            assert closed == "4", closed
            # Another address on the same network, and loopback, are served meanwhile.
            fetch = subprocess.run(neighbour.command(
                "python3", "-c", "import ssl, urllib.request; ctx = ssl.SSLContext("
                "ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; "
                "ctx.verify_mode = ssl.CERT_NONE; print(urllib.request.urlopen("
                f"'https://{address}:{live.port}/v1/health', context=ctx, timeout=5).status)"),
                capture_output=True, text=True, timeout=30)
            assert fetch.stdout.strip() == "200", fetch.stderr
            assert answered_in(live, 5) < 2
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
        assert "refused a connection from" in live.output()
    finally:
        live.stop()
        lab.close()


def test_the_rules_the_front_reads_heads_by() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody") == 27
    assert body_length(b"POST / HTTP/1.1\r\ncontent-LENGTH:  12 \r\n\r\n") == 12
    assert body_length(b"POST / HTTP/1.1\r\nX-Content-Length: 12\r\n\r\n") is None
    assert source_of(("127.0.0.5", 1)) is None and source_of(("::1", 1, 0, 0)) is None
    assert source_of(("::ffff:10.1.2.3", 1, 0, 0)) == "10.1.2.3"
    assert source_of(("2001:db8:1:2:3:4:5:6", 1, 0, 0)) == "2001:db8:1:2::/64"


def test_long_lived_streams_keep_working_after_their_head(server: LiveServer) -> None:
    """A kept-alive connection's second request is read by the front too, and answered."""
    conn = tls_connection(server.port)
    try:
        for _ in range(3):
            conn.sendall(HEAD)
            conn.settimeout(5)
            reply = b""
            while head_end(reply) < 0 or len(reply) < head_end(reply) + (
                    body_length(reply[:head_end(reply)]) or 0):
                ready = select.select([conn], [], [], 5)[0]
                assert ready, reply
                reply += conn.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200"), reply
    finally:
        conn.close()


def read_all(conn: ssl.SSLSocket, timeout: float) -> tuple[bytes, float]:
    """Everything until the server closes, and how long that took."""
    conn.settimeout(timeout)
    started, reply = time.monotonic(), b""
    try:
        while chunk := conn.recv(4096):
            reply += chunk
    except TimeoutError:
        pass
    return reply, time.monotonic() - started


def test_what_is_not_http_is_answered_400_at_once(server: LiveServer) -> None:
    conn = tls_connection(server.port)
    try:
        conn.send(b"\r\n0 not a request")
        reply, took = read_all(conn, 10)
    finally:
        conn.close()
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert took < 2  # not held until the head's deadline, nor in a thread
    assert answered_in(server, 5) < 2


def test_a_body_that_trickles_is_cut_whatever_length_it_declares(server: LiveServer) -> None:
    """A declared 1 GiB upload earns no time by declaring it: the body must keep coming at
    64 KiB/s on average, so a trickle after 70 KB is cut within seconds, not hours."""
    conn = tls_connection(server.port)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            try:
                conn.send(b"x")
            except OSError:
                return

    try:
        conn.sendall(b"POST /v1/speedtest/upload HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1073741824\r\n\r\n" + b"x" * 70_000)
        dripping = threading.Thread(target=trickle, daemon=True)
        dripping.start()
        reply, took = read_all(conn, 30)
    finally:
        stop.set()
        conn.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert took < 3 + 70_000 / 65536 + 3, took  # head_seconds, what 70 KB earned, a margin
