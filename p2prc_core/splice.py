"""Two connections joined byte for byte, in one thread: a tunnel's or a relay's.

Either side may be a TLS socket (``ssl.SSLSocket``) or a plain one. Both are made
non-blocking and served by one ``selectors`` loop, with a bounded buffer each way, so one
thread carries both directions without ever using a TLS socket from two threads at once,
and a side that stops reading stops the other from sending (back pressure), not the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("p2prc.splice")

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
            _wait(selector, sides, block)
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
    while not source.eof and len(sink.outbox) < _room(block):
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


def _room(block: int) -> int:
    """How much may wait for a side before the other is no longer read (``_read``), and
    so no longer waited on: the same rule for both, or a side that cannot be read is
    waited on, and wakes the loop, again and again."""
    return min(_HIGH_WATER, 4 * block)


def _wait(selector: selectors.BaseSelector, sides: tuple[_Side, _Side], block: int) -> None:
    if any(side.pending() for side in sides):
        return  # TLS holds decrypted bytes that select() cannot see
    for side, other in ((sides[0], sides[1]), (sides[1], sides[0])):
        events = 0
        if not side.eof and len(other.outbox) < _room(block):
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


class _Pair:
    """One joined pair in a ``SpliceLoop``: ``splice``'s state, kept between steps."""

    def __init__(self, a: socket.socket, b: socket.socket, idle: float | None,
                 alive: Callable[[], bool] | None, rate: float | None,
                 finished: Callable[[Spliced], None] | None):
        self.sides = (_Side(a), _Side(b))
        self.fds = (a.fileno(), b.fileno())  # (to unregister them once closed)
        self.done = Spliced()
        self.idle = idle
        self.alive = alive
        self.rate = rate
        self.finished = finished
        self.started = self.last_move = time.monotonic()
        self.block = _BLOCK if not rate else int(min(_BLOCK, max(4096, rate / 50)))
        self.resume_at = 0.0  # held back by the cap until then

    def step(self, now: float) -> bool:
        """Move what can move without waiting; True once the pair is done (``done.reason``
        says why)."""
        pause = _ahead(self.done, self.rate, self.started)
        moved = False
        if pause <= 0:
            for source, sink in ((self.sides[0], self.sides[1]),
                                 (self.sides[1], self.sides[0])):
                moved |= _read(source, sink, self.done, source is self.sides[0], self.block)
        for side in self.sides:
            moved |= _write(side)
        if any(s.eof for s in self.sides) and (all(not s.outbox for s in self.sides)
                                               or now - self.last_move > 5):
            self.done.reason = self.done.reason or "closed"
            return True
        if moved or pause > 0:  # held back by the cap is not idle
            self.last_move = now
        self.resume_at = now + min(pause, 0.05) if pause > 0 else 0.0
        return False

    def expired(self, now: float) -> bool:
        if self.idle is not None and now - self.last_move > self.idle:
            self.done.reason = "idle"
            return True
        if self.alive is not None and not self.alive():
            self.done.reason = "server stopping"
            return True
        return False

    def interest(self) -> list[tuple[socket.socket, int]]:
        """What to wait for on each side now (``_wait``'s rule)."""
        wanted = []
        for side, other in ((self.sides[0], self.sides[1]), (self.sides[1], self.sides[0])):
            events = 0
            if not side.eof and len(other.outbox) < _room(self.block) and not self.resume_at:
                events |= selectors.EVENT_READ
            if side.outbox:
                events |= selectors.EVENT_WRITE
            wanted.append((side.sock, events))
        return wanted


class SpliceLoop:
    """Many joined pairs in one thread (``carry``), each as ``splice`` joins one: a relay
    carries hundreds of streams without a thread each. Sockets handed over belong to the
    loop, which closes them."""

    SWEEP_SECONDS = 0.5  # idle, stopping and held-back pairs are looked at this often

    def __init__(self, name: str = "p2prc-splice"):
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._new: list[_Pair] = []
        self._pairs: set[_Pair] = set()
        self._thread: threading.Thread | None = None

    def carry(self, a: socket.socket, b: socket.socket, idle_seconds: float | None = None,
              alive: Callable[[], bool] | None = None, bytes_per_second: float | None = None,
              finished: Callable[[Spliced], None] | None = None) -> None:
        """Join ``a`` and ``b`` as ``splice`` does, in the loop's thread; returns at once.
        ``finished`` runs (in the loop's thread) with what went each way once both are
        closed."""
        for sock in (a, b):
            sock.setblocking(False)
        with self._lock:
            if self._thread is None:  # (set once started: a thread that could not start
                thread = threading.Thread(target=self._run, name=self.name,  # is tried
                                          daemon=True)  # again by the next carry)
                thread.start()
                self._thread = thread
            self._new.append(_Pair(a, b, idle_seconds, alive, bytes_per_second, finished))
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already

    def __len__(self) -> int:
        """The pairs carried now."""
        with self._lock:
            return len(self._pairs) + len(self._new)

    def _run(self) -> None:
        ready: set[_Pair] = set()
        next_sweep = time.monotonic() + self.SWEEP_SECONDS
        while True:
            with self._lock:
                fresh, self._new = self._new, []
            self._pairs.update(fresh)
            ready.update(fresh)
            now = time.monotonic()
            for pair in list(ready):
                try:
                    self._step(pair, now)
                except Exception:  # noqa: BLE001 - one pair's fault must not end the loop
                    log.exception("a joined stream failed")
                    pair.done.reason = pair.done.reason or "failed"
                    self._end(pair)
            ready = {p for p in self._pairs if any(s.pending() for s in p.sides)}
            now = time.monotonic()
            ready.update(p for p in self._pairs if p.resume_at and now >= p.resume_at)
            if now >= next_sweep:
                next_sweep = now + self.SWEEP_SECONDS
                for pair in list(self._pairs):
                    if pair.expired(now):
                        self._end(pair)
                        ready.discard(pair)
            timeout = 0.0 if ready else max(0.0, min(next_sweep, self._soonest_resume())
                                            - now)
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                else:
                    ready.add(key.data)

    def _soonest_resume(self) -> float:
        times = [p.resume_at for p in self._pairs if p.resume_at]
        return min(times) if times else float("inf")

    def _step(self, pair: _Pair, now: float) -> None:
        if pair not in self._pairs:
            return  # ended meanwhile
        try:
            finished = pair.step(now)
        except (ConnectionError, OSError, ssl.SSLError) as err:
            pair.done.reason = f"broken: {err}"
            finished = True
        if finished:
            self._end(pair)
            return
        try:
            for sock, events in pair.interest():
                key = self._selector.get_map().get(sock.fileno())
                if events and key is None:
                    self._selector.register(sock, events, pair)
                elif events and key is not None and key.events != events:
                    self._selector.modify(sock, events, pair)
                elif not events and key is not None:
                    self._selector.unregister(sock)
        except (ValueError, OSError) as err:  # a socket closed under it
            pair.done.reason = f"broken: {err}"
            self._end(pair)

    def _end(self, pair: _Pair) -> None:
        self._pairs.discard(pair)
        for fd in pair.fds:
            if fd in self._selector.get_map():
                self._selector.unregister(fd)
        for side in pair.sides:
            _close(side.sock)
        if pair.finished is not None:
            try:
                pair.finished(pair.done)
            except Exception:  # noqa: BLE001 - a callback's fault must not end the loop
                log.exception("after a stream ended")


_loops: dict[str, tuple[int, SpliceLoop]] = {}
_loops_lock = threading.Lock()


def process_loop(name: str) -> SpliceLoop:
    """This process's loop called ``name`` (made in the process that uses it: a loop made
    before gunicorn forks would be shared by every worker)."""
    with _loops_lock:
        found = _loops.get(name)
        if found is None or found[0] != os.getpid():
            found = _loops[name] = (os.getpid(), SpliceLoop(name))
        return found[1]

