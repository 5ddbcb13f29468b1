"""Two connections joined byte for byte, in one thread: a tunnel's or a relay's.

Either side may be a TLS socket (``ssl.SSLSocket``) or a plain one. Both are made
non-blocking and served by one ``selectors`` loop, with a bounded buffer each way, so one
thread carries both directions without ever using a TLS socket from two threads at once,
and a side that stops reading stops the other from sending (back pressure), not the loop.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

_BLOCK = 256 << 10  # read at most this much at a time
_HIGH_WATER = 1 << 20  # stop reading a side while this much waits to go to the other
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)


@dataclass
class Spliced:
    """What went each way, for the log and limits."""

    a_to_b: int = 0
    b_to_a: int = 0
    reason: str = ""


class _Side:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.outbox = bytearray()  # bytes waiting to be written to this side
        self.eof = False  # this side sent everything it will

    def pending(self) -> int:
        return self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0


def splice(a: socket.socket, b: socket.socket, idle_seconds: float | None = None,
           alive: Callable[[], bool] | None = None,
           bytes_per_second: float | None = None) -> Spliced:
    """Copy ``a``'s bytes to ``b`` and ``b``'s to ``a`` until one side closes (what it sent
    is still delivered), nothing moves for ``idle_seconds``, or ``alive()`` turns false (the
    server stops). ``bytes_per_second`` caps each direction. Both sockets are closed.
    """
    sides = (_Side(a), _Side(b))
    done = Spliced()
    selector = selectors.DefaultSelector()
    for side in sides:
        side.sock.setblocking(False)
    last_move = time.monotonic()
    started = last_move
    # Under a cap, small reads: the cap is kept to within one read.
    block = _BLOCK if not bytes_per_second else \
        int(min(_BLOCK, max(4096, bytes_per_second / 50)))
    try:
        while True:
            moved = False
            pause = _ahead(done, bytes_per_second, started)
            if pause <= 0:  # under the cap (if any): read on
                for source, sink in ((sides[0], sides[1]), (sides[1], sides[0])):
                    moved |= _read(source, sink, done, source is sides[0], block)
            for side in sides:
                moved |= _write(side)
            if any(s.eof for s in sides):
                # One side is done: deliver what it sent, then close both.
                if all(not s.outbox for s in sides) or time.monotonic() - last_move > 5:
                    done.reason = done.reason or "closed"
                    return done
            if moved:
                last_move = time.monotonic()
                continue
            if pause > 0:  # what waits is still written above; no reading till then
                time.sleep(min(pause, 0.05))
                last_move = time.monotonic()  # held back by the cap, not idle
                continue
            if idle_seconds is not None and time.monotonic() - last_move > idle_seconds:
                done.reason = "idle"
                return done
            if alive is not None and not alive():
                done.reason = "server stopping"
                return done
            _wait(selector, sides)
    except (ConnectionError, OSError, ssl.SSLError) as err:
        done.reason = f"broken: {err}"
        return done
    finally:
        selector.close()
        for side in sides:
            _close(side.sock)


def _ahead(done: Spliced, bytes_per_second: float | None, started: float) -> float:
    """Seconds the busier direction is ahead of ``bytes_per_second`` (0 without a cap)."""
    if not bytes_per_second:
        return 0.0
    return max(done.a_to_b, done.b_to_a) / bytes_per_second - (time.monotonic() - started)


def _read(source: _Side, sink: _Side, done: Spliced, forward: bool,
          block: int = _BLOCK) -> bool:
    moved = False
    while not source.eof and len(sink.outbox) < min(_HIGH_WATER, 4 * block):
        try:
            data = source.sock.recv(block)
        except _WOULD_BLOCK:
            break
        if not data:
            source.eof = True
            break
        sink.outbox += data
        moved = True
        if forward:
            done.a_to_b += len(data)
        else:
            done.b_to_a += len(data)
    return moved


def _write(side: _Side) -> bool:
    moved = False
    while side.outbox:
        try:
            sent = side.sock.send(side.outbox[:_BLOCK])
        except _WOULD_BLOCK:
            break
        if not sent:
            break
        del side.outbox[:sent]
        moved = True
    return moved


def _wait(selector: selectors.BaseSelector, sides: tuple[_Side, _Side]) -> None:
    if any(side.pending() for side in sides):
        return  # TLS holds decrypted bytes that select() cannot see
    for side, other in ((sides[0], sides[1]), (sides[1], sides[0])):
        events = 0
        if not side.eof and len(other.outbox) < _HIGH_WATER:
            events |= selectors.EVENT_READ
        if side.outbox:
            events |= selectors.EVENT_WRITE
        key = selector.get_map().get(side.sock.fileno())
        if events and key is None:
            selector.register(side.sock, events)
        elif events:
            selector.modify(side.sock, events)
        elif key is not None:
            selector.unregister(side.sock)
    if selector.get_map():
        selector.select(0.5)


def no_delay(sock: socket.socket) -> socket.socket:
    """Send each write at once (no Nagle): a relayed answer is several small TLS records,
    and waiting for the first one's ACK costs a delayed-ACK timeout (~40 ms) each."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return sock


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
