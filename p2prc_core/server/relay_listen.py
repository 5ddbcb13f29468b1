"""Nodes that wait at a relay without a thread each: ``POST /v1/relay/listen``.

A node behind NAT keeps one connection to its relay, switched to a stream (``upgrade``).
The relay writes a line to it for each client that comes (``wire.RelayWait`` as JSON:
accept it with ``POST /v1/relay/accept``), and an empty line every
``wire.LISTEN_KEEPALIVE_SECONDS``
so that each side learns of a dead other. The node sends nothing. One loop thread per
worker (``ListenLoop``) holds every such connection, and the Unix listener where connects
from any worker hand it tokens (``relayhub.Waiting``). The long poll (``/v1/relay/wait``)
stays for nodes of earlier versions.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

from p2prc_core import relayhub
from p2prc_core.relayhub import Waiting
from p2prc_core.wire import LISTEN_KEEPALIVE_SECONDS, RelayWait, encode

log = logging.getLogger("p2prc.server")

# The node is marked as still here (``RelayHub.known``) well within the hub's window.
SEEN_EVERY = relayhub.SEEN_SECONDS / 3
MAX_OUTBOX = 16 << 10  # a node that leaves this much unread is dropped
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)


class _Held:
    """One node's connection, its place at the relay, and what waits to be written."""

    def __init__(self, sock: socket.socket, waiting: Waiting, release: Callable[[], None],
                 alive: Callable[[], bool], now: float):
        self.sock = sock
        self.waiting = waiting
        self.release = release
        self.alive = alive
        self.outbox = bytearray()
        self.tellers: list[socket.socket] = []  # told "ok" once their line is written
        self.next_keepalive = now + LISTEN_KEEPALIVE_SECONDS
        self.next_seen = now + SEEN_EVERY
        self.fds = (sock.fileno(), waiting.listener.fileno())


class ListenLoop:
    """Every node listening at this worker, in one thread (``hold``)."""

    def __init__(self, name: str = "p2prc-relay-listen"):
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._new: list[_Held] = []
        self._held: set[_Held] = set()
        self._thread: threading.Thread | None = None

    def hold(self, sock: socket.socket, waiting: Waiting, release: Callable[[], None],
             alive: Callable[[], bool]) -> None:
        """Keep ``sock`` (a node's switched connection) and its place ``waiting`` until the
        node goes, stops reading, or ``alive()`` turns false; then close both and call
        ``release``. Returns at once."""
        sock.setblocking(False)
        waiting.listener.setblocking(False)
        with self._lock:
            if self._thread is None:  # (set once started: see SpliceLoop.carry)
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                thread.start()
                self._thread = thread
            self._new.append(_Held(sock, waiting, release, alive, time.monotonic()))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def __len__(self) -> int:
        with self._lock:
            return len(self._held) + len(self._new)

    def _run(self) -> None:
        next_sweep = 0.0
        while True:
            with self._lock:
                fresh, self._new = self._new, []
            for held in fresh:
                self._held.add(held)
                try:
                    self._selector.register(held.sock, selectors.EVENT_READ, (held, "node"))
                    self._selector.register(held.waiting.listener, selectors.EVENT_READ,
                                            (held, "hub"))
                except (KeyError, ValueError, OSError) as err:  # closed under it
                    log.debug("relay listener of %s: %s", held.waiting.node_id, err)
                    self._end(held)
            for key, events in self._selector.select(1.0):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                held, what = key.data
                if held not in self._held:
                    continue
                try:
                    if what == "hub":
                        self._tell(held)
                    elif events & selectors.EVENT_READ:
                        self._heard(held)
                    if held in self._held and events & selectors.EVENT_WRITE:
                        self._flush(held)
                except (OSError, ssl.SSLError, ValueError) as err:
                    log.debug("relay listener of %s: %s", held.waiting.node_id, err)
                    self._end(held)
                except Exception:  # noqa: BLE001 - one node's fault must not end the loop
                    log.exception("relay listener of %s failed", held.waiting.node_id)
                    self._end(held)
            now = time.monotonic()
            if now >= next_sweep:  # (not after every event: a relay holds many nodes)
                next_sweep = now + 0.5
                self._timers(now)

    def _tell(self, held: _Held) -> None:
        """A client's connect brings a token: write its line to the node."""
        got = held.waiting.take()
        if got is None:
            return
        teller, token = got
        held.outbox += encode(RelayWait(token)) + b"\n"
        held.tellers.append(teller)
        self._flush(held)

    def _heard(self, held: _Held) -> None:
        """The node sends nothing while it listens: anything readable is its end."""
        try:
            data = held.sock.recv(1)
        except _WOULD_BLOCK:
            return
        log.debug("relay listener of %s ended: %s", held.waiting.node_id,
                  "closed" if not data else "it sent bytes")
        self._end(held)

    def _flush(self, held: _Held) -> None:
        while held.outbox:
            try:
                sent = held.sock.send(held.outbox)
            except _WOULD_BLOCK:
                break
            del held.outbox[:sent]
        if held.outbox:
            if len(held.outbox) > MAX_OUTBOX:  # it does not read: it is not listening
                self._end(held)
                return
            self._selector.modify(held.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                  (held, "node"))
            return
        self._selector.modify(held.sock, selectors.EVENT_READ, (held, "node"))
        for teller in held.tellers:  # the node has their tokens: say so
            with contextlib.suppress(OSError):
                teller.setblocking(False)
                teller.send(b"ok")
            teller.close()
        held.tellers.clear()

    def _timers(self, now: float) -> None:
        for held in list(self._held):
            try:
                if not held.alive():
                    self._end(held)
                    continue
                if now >= held.next_seen:
                    held.next_seen = now + SEEN_EVERY
                    held.waiting.seen()
                if now >= held.next_keepalive:
                    held.next_keepalive = now + LISTEN_KEEPALIVE_SECONDS
                    held.outbox += b"\n"
                    self._flush(held)
            except (OSError, ssl.SSLError, ValueError):
                self._end(held)

    def end_all(self) -> None:
        """Give up every node's place (its marker): this worker is ending. Connects in
        other workers no longer find them; the nodes see the connection close."""
        with self._lock:
            everyone = [*self._held, *self._new]
        for held in everyone:
            with contextlib.suppress(Exception):
                held.waiting.close()
                held.sock.close()

    def _end(self, held: _Held) -> None:
        if held not in self._held:
            return
        self._held.discard(held)
        for fd in held.fds:
            if fd in self._selector.get_map():
                self._selector.unregister(fd)
        for teller in held.tellers:  # no "ok": the connect tries the node's next place
            teller.close()
        held.waiting.close()
        with contextlib.suppress(OSError):
            held.sock.close()
        try:
            held.release()
        except Exception:  # noqa: BLE001
            log.exception("after a relay listener ended")


_loop: tuple[int, ListenLoop] | None = None
_loop_lock = threading.Lock()


def listen_loop() -> ListenLoop:
    """This worker process's ``ListenLoop`` (made in the process that uses it)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop[0] != os.getpid():
            _loop = (os.getpid(), ListenLoop())
            # A worker that ends (stopped, or restarted by its master) gives up its nodes'
            # places at once: its loop is a daemon thread, which would just vanish.
            atexit.register(_loop[1].end_all)
        return _loop[1]
