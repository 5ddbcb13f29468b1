"""``splice.SpliceLoop``: many joined pairs in one thread, as a relay carries its streams.
Real sockets (Unix socket pairs, and TLS over TCP on loopback with node certificates)."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from p2prc_core import tls
from p2prc_core.identity import NodeIdentity
from p2prc_core.splice import Spliced, SpliceLoop


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def joined(loop: SpliceLoop, ends: list[Spliced], **options: object
           ) -> tuple[socket.socket, socket.socket]:
    """Two outer ends whose inner ends the loop joins: what goes into one comes out of
    the other."""
    left, inner_left = socket.socketpair()
    inner_right, right = socket.socketpair()
    loop.carry(inner_left, inner_right, finished=ends.append, **options)  # type: ignore[arg-type]
    return left, right


def read_all(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    sock.settimeout(30)
    while len(data) < size:
        block = sock.recv(1 << 16)
        if not block:
            break
        data += block
    return bytes(data)


def test_two_hundred_pairs_in_one_thread_carry_every_byte_both_ways() -> None:
    loop = SpliceLoop()
    ends: list[Spliced] = []
    threads_before = threading.active_count()
    pairs = [joined(loop, ends) for _ in range(200)]
    assert threading.active_count() <= threads_before + 1  # the loop's own, no more
    payloads = [(os.urandom(50_000), os.urandom(30_000)) for _ in pairs]
    got: dict[int, tuple[bytes, bytes]] = {}

    def talk(index: int) -> None:
        (left, right), (there, back) = pairs[index], payloads[index]
        sender = threading.Thread(target=left.sendall, args=(there,))
        sender.start()
        right.sendall(back)
        got[index] = (read_all(right, len(there)), read_all(left, len(back)))
        sender.join()

    workers = [threading.Thread(target=talk, args=(i,)) for i in range(len(pairs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(got[i] == payloads[i] for i in range(len(pairs)))
    assert len(loop) == 200
    for left, _right in pairs:
        left.close()
    wait_for(lambda: len(ends) == 200)
    assert all(e.reason == "closed" for e in ends) and len(loop) == 0
    for _, right in pairs:  # the loop closed its ends: the far side sees the end
        right.settimeout(10)
        assert right.recv(10) == b""
        right.close()


def test_what_one_side_sent_before_closing_is_delivered_whole() -> None:
    loop = SpliceLoop()
    ends: list[Spliced] = []
    left, right = joined(loop, ends)
    data = os.urandom(3 << 20)  # more than the loop buffers: back pressure on the way
    threading.Thread(target=lambda: (left.sendall(data), left.close())).start()
    assert read_all(right, len(data) + 1) == data
    wait_for(lambda: bool(ends))
    assert ends[0].a_to_b == len(data) and ends[0].reason == "closed"


def test_an_idle_pair_is_closed_and_the_others_go_on() -> None:
    loop = SpliceLoop()
    ends: list[Spliced] = []
    quiet = joined(loop, ends, idle_seconds=0.5)
    busy = joined(loop, [])
    wait_for(lambda: bool(ends))
    assert ends[0].reason == "idle"
    quiet[1].settimeout(10)
    assert quiet[1].recv(10) == b""
    busy[0].sendall(b"still here")
    assert read_all(busy[1], 10) == b"still here"


def test_a_capped_pair_is_held_to_its_rate_and_a_stopping_server_ends_it() -> None:
    loop = SpliceLoop()
    ends: list[Spliced] = []
    running = threading.Event()
    running.set()
    left, right = joined(loop, ends, bytes_per_second=1_000_000, alive=running.is_set)
    data = os.urandom(2_000_000)
    started = time.monotonic()
    threading.Thread(target=left.sendall, args=(data,), daemon=True).start()
    assert read_all(right, len(data)) == data
    assert time.monotonic() - started > 1.5  # 2 MB at 1 MB/s: not all at once
    running.clear()
    wait_for(lambda: bool(ends))
    assert ends[0].reason == "server stopping"


def test_a_failing_callback_ends_nothing_else() -> None:
    loop = SpliceLoop()

    def fails(_: Spliced) -> None:
        raise RuntimeError("a bug in the caller")

    left, inner = socket.socketpair()
    other, far = socket.socketpair()
    loop.carry(inner, other, finished=fails)
    left.close()
    wait_for(lambda: len(loop) == 0)
    a, b = joined(loop, [])
    a.sendall(b"ok")
    assert read_all(b, 2) == b"ok"


@pytest.fixture
def tls_pairs(tmp_path: Path) -> Callable[[], tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A TLS connection over loopback TCP with a node certificate: the server's end and the
    client's, both after the handshake."""
    identity = NodeIdentity.load_or_create(tmp_path)
    server = tls.server_context(*tls.server_files(tmp_path, identity))
    client = tls.client_context()
    listener = socket.create_server(("127.0.0.1", 0))

    def make() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
        raw = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        done: list[ssl.SSLSocket] = []
        thread = threading.Thread(target=lambda: done.append(
            server.wrap_socket(accepted, server_side=True)))
        thread.start()
        outer = client.wrap_socket(raw)
        thread.join()
        return done[0], outer

    return make


def test_tls_records_decrypted_ahead_are_not_left_waiting(
        tls_pairs: Callable[[], tuple[ssl.SSLSocket, ssl.SSLSocket]]) -> None:
    """A TLS socket may hold decrypted bytes that select() cannot see: many small records
    through 20 TLS pairs at once all arrive, none stuck until the next packet."""
    loop = SpliceLoop()
    streams = []
    for _ in range(20):
        served, client = tls_pairs()
        plain, far = socket.socketpair()
        loop.carry(served, plain)
        streams.append((client, far))
    for client, _far in streams:
        for number in range(50):  # 50 small records, each its own TLS record
            client.sendall(b"record %03d\n" % number)
    for client, far in streams:
        expected = b"".join(b"record %03d\n" % n for n in range(50))
        assert read_all(far, len(expected)) == expected
        far.sendall(b"answer")
        client.settimeout(10)
        assert read_all(client, 6) == b"answer"


def test_tls_bytes_held_back_behind_a_slow_reader_still_come(
        tls_pairs: Callable[[], tuple[ssl.SSLSocket, ssl.SSLSocket]]) -> None:
    """3 MB through TLS to a side that reads nothing for a while: the loop stops reading
    once it holds 1 MiB for that side, with decrypted bytes left inside TLS, where select()
    cannot see them; once the reader reads, every byte must come."""
    loop = SpliceLoop()
    for _ in range(3):
        served, client = tls_pairs()
        plain, far = socket.socketpair()
        loop.carry(served, plain)
        data = os.urandom(3 << 20)
        threading.Thread(target=client.sendall, args=(data,), daemon=True).start()
        time.sleep(0.5)  # the reader is slow (not a wait for a condition: the point)
        assert read_all(far, len(data)) == data
