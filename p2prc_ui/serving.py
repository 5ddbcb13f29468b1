"""Where the dashboard listens and how it holds its connections.

It serves on an address of its own (a random 127.A.B.C), so that the browser sends its
cookie to no other local service (a browser sends a host's cookies to every port of it, a
port ``p2prc forward`` serves from a stranger's container included). Its connections are
held to caps, in all and per source address, and each request head must come within a few
seconds: clients that hold connections open, or send a byte at a time, keep no one out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import falcon

log = logging.getLogger("p2prc.ui")

MAX_CONNECTIONS = 64  # connections held at once (see Connections)
MAX_PER_SOURCE = 32  # of those, from one address (a browser opens six or so)
HEAD_SECONDS = 5.0  # a request's line and headers must all come within this of connecting


@dataclass(frozen=True)
class Served:
    """Where the dashboard answers, as ``serve`` tells ``ready``."""

    url: str  # with the token: for the user (printed)
    opener: str  # with a code that works once: for a browser started on it, through a file
    warning: str | None = None  # why it serves where other local services get its cookie


def own_address() -> str:
    """A random address in 127.0.0.0/8 outside 127.0.0.x (127.0.0.1, 127.0.0.53 and 127.0.1.1
    are taken by other services): the dashboard's own, whose cookie no other service gets."""
    return (f"127.{1 + secrets.randbelow(254)}.{secrets.randbelow(256)}."
            f"{1 + secrets.randbelow(254)}")


class Connections:
    """The connections the dashboard holds: at most ``total`` at once and ``per_source`` from
    one address, and each must send its request head within ``head_seconds`` of connecting.
    A newcomer over a cap displaces the oldest connection still waiting for its head (over
    the total, one of the source that has the most waiting), so connections held silent or
    fed a byte at a time keep no one out for long; where none waits, the newcomer is closed.
    """

    def __init__(self, total: int = MAX_CONNECTIONS, per_source: int = MAX_PER_SOURCE,
                 head_seconds: float = HEAD_SECONDS):
        self.total, self.per_source, self.head_seconds = total, per_source, head_seconds
        self._deadlines: dict[Any, tuple[str, float | None]] = {}  # oldest first
        self._lock = threading.Lock()

    def admit(self, conn: Any, source: str) -> bool:
        """Hold ``conn`` (a socket) from ``source``; False where it must be closed."""
        with self._lock:
            mine = [c for c, (s, _) in self._deadlines.items() if s == source]
            if len(mine) >= self.per_source and not self._displace(mine):
                return False
            if len(self._deadlines) >= self.total and not self._displace(self._greediest()):
                return False
            self._deadlines[conn] = (source, time.monotonic() + self.head_seconds)
            return True

    def headed(self, conn: Any) -> bool:
        """Its request head came: no deadline from now on; False where it was cut off."""
        with self._lock:
            held = self._deadlines.get(conn)
            if held is not None:
                self._deadlines[conn] = (held[0], None)
            return held is not None

    def release(self, conn: Any) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def expire(self) -> None:
        """Cut off each connection whose head is late."""
        now = time.monotonic()
        with self._lock:
            for conn in [c for c, (_, due) in self._deadlines.items()
                         if due is not None and due < now]:
                self._cut(conn)

    def _greediest(self) -> list[Any]:
        """The connections of the source with the most waiting for their heads."""
        waiting = Counter(s for s, due in self._deadlines.values() if due is not None)
        if not waiting:
            return []
        source = waiting.most_common(1)[0][0]
        return [c for c, (s, _) in self._deadlines.items() if s == source]

    def _displace(self, among: list[Any]) -> bool:
        """Cut off the oldest of ``among`` still waiting for its head; False if none is."""
        for conn in among:
            if self._deadlines[conn][1] is not None:
                self._cut(conn)
                return True
        return False

    def _cut(self, conn: Any) -> None:
        """Close it under its handler, which then reads the end of the stream and stops."""
        del self._deadlines[conn]
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


def _server(host: str, port: int, app: falcon.App) -> Any:
    """A threaded WSGI server bound to ``host``:``port``, its connections held to
    ``Connections``."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    connections = Connections()

    class Quiet(WSGIRequestHandler):
        timeout = 15  # seconds a connection may stay silent (a slow form, a slow reader)

        def parse_request(self) -> bool:
            parsed = super().parse_request()
            return connections.headed(self.connection) and parsed

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug(format, *args)

    class Threaded(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = MAX_CONNECTIONS
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def server_bind(self) -> None:
            """As HTTPServer's, without its reverse DNS lookup of the address (which can
            take seconds for a 127.A.B.C where no resolver answers)."""
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), \
                int(self.server_address[1])
            self.setup_environ()

        def process_request(self, request: Any, client_address: Any) -> None:
            if not connections.admit(request, str(client_address[0])):
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            connections.release(request)
            super().shutdown_request(request)

        def service_actions(self) -> None:  # every half second, from serve_forever
            connections.expire()

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("dashboard connection from %s failed", client_address[0],
                      exc_info=True)  # most often one cut off, or its client gone

    return make_server(host, port, app, server_class=Threaded, handler_class=Quiet)


def bind(host: str | None, port: int, app: falcon.App) -> tuple[Any, str | None]:
    """The server on ``host``, or else on an address of its own (on 127.0.0.1 where the
    system gives none, with a warning that says so)."""
    if host is not None:
        return _server(host, port, app), None
    own = own_address()
    try:
        return _server(own, port, app), None
    except OSError as err:
        if err.errno != errno.EADDRNOTAVAIL:
            raise
        why = err.strerror
    return _server("127.0.0.1", port, app), (
        f"serving on 127.0.0.1, as this system gives the dashboard no address of its own "
        f"({own}: {why}): its cookie then goes to every local service you open in that "
        f"browser too. Add an address to loopback (macOS: sudo ifconfig lo0 alias "
        f"{own} up) and give it with --host {own}.")


def hosts(host: str, port: int) -> set[str]:
    """The Host headers a server on ``host``:``port`` answers to."""
    shown = f"[{host}]" if ":" in host else host
    if host.startswith("127.") and host != "127.0.0.1":
        return {f"{shown}:{port}"}  # an address of its own: no name reaches it
    names = {f"{shown}:{port}", f"localhost:{port}"}
    if host in ("127.0.0.1", "::1"):
        names |= {f"127.0.0.1:{port}", f"[::1]:{port}"}
    return names
