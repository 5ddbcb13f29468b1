"""The server's front: every request head is read without a thread.

gunicorn's gthread worker gives each new connection a thread, which then waits for the TLS
handshake and the request head with a timeout per ``recv``: a client that sends one byte
every few seconds holds that thread for as long as it likes, and a few dozen such clients
hold them all, with no key needed. Here the worker's own event loop (the one that accepts)
does the handshake and reads the head, and a small body, without blocking; only a complete
request goes to a thread. So:

- an ordinary request always finds a thread: slow and silent connections wait in the
  event loop, which costs a file descriptor and a few KiB each, not a thread;
- each request head (handshake included) has an absolute deadline, ``head_seconds``;
- a body too large to read here (or chunked) must keep coming: the deadline starts at
  ``head_seconds`` from the hand-off and each byte read moves it on at ``tls.BODY_RATE``
  (64 KiB/s), whatever length was declared; every read in the thread waits only for what
  is left (``tls.time_left``), and past it the app answers 408;
- what is not HTTP (a TLS hello to a plain server) is answered 400 here, and connections
  are closed without waiting in the event loop for the client to close first;
- one source (an IPv4 address, an IPv6 /64) holds at most ``per_source`` connections to
  this worker at once; loopback is not counted (relayed clients arrive from it).

This subclasses gthread's worker and uses its internals, so the gunicorn version is pinned
in pyproject.toml to the series it was written for.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import re
import selectors
import socket
import ssl
import time
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn import sock as gsock
from gunicorn.workers.gthread import TConn, ThreadWorker

from p2prc_core import tls
from p2prc_core.server.upgrade import KEPT

log = logging.getLogger("p2prc.server")

MAX_HEAD_BYTES = 64 << 10  # a head longer than this is answered 431
FRONT_BODY_BYTES = 64 << 10  # bodies up to this are read here too; larger ones in the thread
_LENGTH = re.compile(rb"\r?\ncontent-length:[ \t]*(\d{1,19})[ \t]*\r?\n", re.IGNORECASE)


def _answer(status: str, title: str, description: str) -> bytes:
    """A whole response in p2prc's error shape, for a connection given up on here."""
    body = json.dumps({"title": title, "description": description}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


_TOO_LARGE = _answer("431 Request Header Fields Too Large", "Request head too large",
                     f"This server reads request heads of at most {MAX_HEAD_BYTES >> 10} KiB.")
_NOT_HTTP = _answer("400 Bad Request", "Not HTTP",
                    "This is a p2prc node: it speaks HTTP/1.1 (over TLS 1.3 unless its "
                    "transport is http).")
_TOO_SLOW = _answer("408 Request Timeout", "Request too slow",
                    "The request did not arrive in time; send it again, faster.")


def source_of(client: Any) -> str | None:
    """Whose connections count together: an IPv4 address, an IPv6 /64; None for loopback
    (and a Unix socket), which is not limited."""
    try:
        address = ipaddress.ip_address(str(client[0]).split("%")[0])
    except (ValueError, TypeError, IndexError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def head_end(data: bytes | bytearray) -> int:
    """Where the head ends (the index after its blank line), or -1 while it goes on."""
    for mark in (b"\r\n\r\n", b"\n\n"):
        at = data.find(mark)
        if at >= 0:
            return at + len(mark)
    return -1


def not_http(data: bytes | bytearray) -> bool:
    """Whether what came cannot be an HTTP/1 request: it starts (after at most one empty
    line, which RFC 9112 lets a server skip) with something other than a method's letter,
    as a TLS hello to a plain server does."""
    if b"\r\n".startswith(data):
        return False  # nothing yet, or an empty line on its way
    start = data[2:] if data.startswith(b"\r\n") else data[1:] if data[:1] == b"\n" else data
    return bool(start) and not start[:1].isalpha()


def body_length(head: bytes | bytearray) -> int | None:
    """The head's Content-Length; None for none (or chunked: read in the thread)."""
    found = _LENGTH.search(head)
    return int(found.group(1)) if found else None


def _pending(sock: Any) -> bool:
    """Whether TLS holds decrypted bytes not read yet (select does not see those)."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


class _Plain(tls.TimedReads, socket.socket):
    """A plain (``transport = "http"``) connection with the same rules as a TLS one."""

    def recv(self, size: int, flags: int = 0) -> bytes:
        self._before_read()
        got = super().recv(size, flags)
        self._after_read(got)
        return got

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._before_read()
        got = super().recv_into(buffer, nbytes, flags)
        self._after_read(got)
        return got


class _Conn(TConn):  # type: ignore[misc]
    """gthread's connection, with what the front needs: the head read so far, its
    deadline, and the source it counts against (given back once, when it closes)."""

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any, source: str | None,
                 closed: Any):
        super().__init__(cfg, sock, client, server)
        self.source = source
        self.head = bytearray()
        self.deadline = 0.0
        self.handshaken = not cfg.is_ssl
        self._closed = closed

    def close(self, graceful: bool = False) -> None:
        """Closed at once: gthread's graceful close waits (up to 2 s, in the event loop)
        for the client to close first, which a stranger need never do. The write side is
        shut first, so what was answered is sent whole."""
        try:
            if getattr(self.sock, KEPT, False):
                return  # a stream's loop has it now, and closes it when the stream ends
            if graceful:
                with contextlib.suppress(OSError, ValueError):
                    self.sock.setblocking(False)
                    self.sock.shutdown(socket.SHUT_WR)
            super().close(False)
        finally:
            if self._closed is not None:
                closed, self._closed = self._closed, None
                closed(self)


class FrontWorker(ThreadWorker):  # type: ignore[misc]
    """gthread with the front described above; ``configure`` makes one with limits."""

    head_seconds = 10.0
    per_source = 32
    socket_timeout = 30.0

    @classmethod
    def configure(cls, head_seconds: float, per_source: int,
                  socket_timeout: float) -> type[FrontWorker]:
        return type("P2PRCWorker", (cls,), {"head_seconds": head_seconds,
                                            "per_source": per_source,
                                            "socket_timeout": socket_timeout})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sources: dict[str, int] = {}
        self.heads: set[_Conn] = set()
        self.refused = 0
        self.accept_paused_until = 0.0

    # -- accepting ---------------------------------------------------------------------------

    def accept(self, listener: Any) -> None:
        if time.monotonic() < self.accept_paused_until:
            return
        try:
            client_sock, client = listener.accept()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors (or memory): wait a moment, as heads time out.
                self.accept_paused_until = time.monotonic() + 0.5
                log.warning("cannot take more connections for now: %s", err.strerror)
                return
            if err.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        source = source_of(client)
        if source is not None and self.sources.get(source, 0) >= self.per_source:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("refused a connection from %s: it holds %d already, the most one "
                            "source may (%d refused so far)", source, self.per_source,
                            self.refused)
            client_sock.close()
            return
        if source is not None:
            self.sources[source] = self.sources.get(source, 0) + 1
        self.nr_conns += 1
        try:
            client_sock = self._timed(client_sock)
        except (OSError, ValueError):
            self.nr_conns -= 1
            self._release_source(source)
            return
        conn = _Conn(self.cfg, client_sock, client, listener.getsockname(), source,
                     self._on_close)
        self._read_head(conn)

    def _timed(self, client_sock: socket.socket) -> Any:
        """The accepted socket as a TLS connection not yet shaken hands, or a plain one,
        both non-blocking, with the timeout and deadline rules."""
        if self.cfg.is_ssl:
            wrapped = gsock.ssl_context(self.cfg).wrap_socket(
                client_sock, server_side=True, do_handshake_on_connect=False,
                suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
            wrapped.setblocking(False)
            return wrapped
        plain = _Plain(client_sock.family, client_sock.type, client_sock.proto,
                       fileno=client_sock.detach())
        plain.socket_timeout = self.socket_timeout
        plain.setblocking(False)
        return plain

    def _release_source(self, source: str | None) -> None:
        if source is None:
            return
        left = self.sources.get(source, 0) - 1
        if left > 0:
            self.sources[source] = left
        else:
            self.sources.pop(source, None)

    def _on_close(self, conn: _Conn) -> None:
        self.heads.discard(conn)
        self._release_source(conn.source)

    # -- reading heads in the event loop -----------------------------------------------------

    def _read_head(self, conn: _Conn) -> None:
        conn.deadline = time.monotonic() + self.head_seconds
        conn.sock.deadline = None  # the thread's deadline is not the event loop's
        self.heads.add(conn)
        self._advance(conn)

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection has its next request: read its head here too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        if isinstance(conn, _Conn):
            self._read_head(conn)
        else:
            self.enqueue_req(conn)

    def _on_event(self, conn: _Conn, _fileobj: Any) -> None:
        self.poller.unregister(conn.sock)
        self._advance(conn)

    def _wait(self, conn: _Conn, events: int) -> None:
        self.poller.register(conn.sock, events, partial(self._on_event, conn))

    def _advance(self, conn: _Conn) -> None:
        """Go as far as the bytes at hand allow: handshake, head, small body."""
        try:
            if not conn.handshaken:
                conn.sock.do_handshake()
                conn.handshaken = True
            while not self._complete(conn):
                data = conn.sock.recv(65536)
                if not data:
                    self._drop(conn)
                    return
                conn.head += data
        except ssl.SSLWantWriteError:
            self._wait(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            self._wait(conn, selectors.EVENT_READ)
            return
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            self._drop(conn)
            return
        if not_http(conn.head):
            self._refuse(conn, _NOT_HTTP)
            return
        if len(conn.head) > MAX_HEAD_BYTES and head_end(conn.head) < 0:
            self._refuse(conn)
            return
        self._handoff(conn)

    def _complete(self, conn: _Conn) -> bool:
        """Whether the request can go to a thread: its head is here, and its body too
        unless the body is too large to read here (or the head is too long)."""
        if not_http(conn.head):
            return True  # answered 400 here (see _advance)
        end = head_end(conn.head)
        if end < 0:
            return len(conn.head) > MAX_HEAD_BYTES
        length = body_length(conn.head[:end])
        if length is None or length > FRONT_BODY_BYTES:
            return True
        return len(conn.head) >= end + length

    def _handoff(self, conn: _Conn) -> None:
        self.heads.discard(conn)
        conn.sock.setblocking(True)  # with its socket timeout
        # What is left of the body must come at tls.BODY_RATE at least: each byte read
        # earns its time (tls.time_left), a declared length earns nothing.
        conn.sock.deadline = time.monotonic() + self.head_seconds
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.initialized = True
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head = bytearray()
        conn.data_ready = True
        self.enqueue_req(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        """gthread's, except that a kept-alive connection whose next request was read ahead
        (a body drain reads past its end) has that head finished here, not in a thread."""
        if isinstance(conn, _Conn) and not fs.cancelled() and fs.exception() is None and \
                fs.result() is True and (conn.parser.unreader.buf.getvalue() or
                                         _pending(conn.sock)):
            conn.head = bytearray(conn.parser.unreader.take_buffered())
            conn.sock.setblocking(False)
            self._read_head(conn)
            return
        super().finish_request(conn, fs)

    def _refuse(self, conn: _Conn, answer: bytes = _TOO_LARGE) -> None:
        """Answer (best effort: the socket does not block) and close."""
        if conn.handshaken:
            try:
                conn.sock.send(answer)
            except (OSError, ValueError):
                pass
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self.heads.discard(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gthread's sweep, and heads past their deadline closed (every loop, about a
        second apart at most)."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive:  # stopping: a head still coming has a moment, not its deadline
            for conn in self.heads:
                conn.deadline = min(conn.deadline, now + 2.0)
        for conn in [c for c in self.heads if c.deadline <= now]:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self._refuse(conn, _TOO_SLOW)
