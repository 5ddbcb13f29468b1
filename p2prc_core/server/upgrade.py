"""HTTP/1.1 Upgrade (RFC 9110, section 7.8) on the peer port: a checked request becomes a
raw byte stream, for tunnels to containers and for relays.

A resource checks the request as usual (signature, owner, limits), then calls ``switch``
with what to do with the connection. Falcon answers ``101 Switching Protocols``;
``Upgrades``, around the whole WSGI app, has gunicorn send that answer and then hands the
connection (TLS already there) to the resource's function. The client waits for the 101
before it sends a byte of the stream, so nothing of it sits in gunicorn's buffers.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import falcon

from p2prc_core.models import STREAM_PROTOCOL  # the Upgrade token a client sends, a 101 names

# What a route does with its switched connection. It returns True when it handed the
# connection on (``keep``: to a loop that closes it, and gives the route's slot back, when
# the stream ends); else the connection is closed, and the slot given back, on return.
Take = Callable[[socket.socket], bool | None]
T = TypeVar("T")
ENV_KEY = "p2prc.upgrade"
CLOSE_KEY = "p2prc.close"  # set in the environ: close the connection after this answer
KEPT = "p2prc_kept"  # set on a socket handed on: gunicorn must not close it (see front)
RETRY_SECONDS = 2  # the Retry-After of a refusal for want of a slot


def wants_upgrade(req: falcon.Request) -> None:
    """Refuse a request that did not ask to switch to a stream (400), or a server that
    cannot hand over its connection (501: only gunicorn's can)."""
    connection = {t.strip().lower() for t in (req.get_header("Connection") or "").split(",")}
    if "upgrade" not in connection or (req.get_header("Upgrade") or "").lower() != STREAM_PROTOCOL:
        raise falcon.HTTPBadRequest(
            title="Not an upgrade",
            description=f"This route switches the connection to a byte stream: send "
                        f"'Connection: Upgrade' and 'Upgrade: {STREAM_PROTOCOL}'.")
    if req.env.get("gunicorn.socket") is None or req.env.get("HTTP2_STREAM_ID"):
        raise falcon.HTTPNotImplemented(
            title="No upgrade here",
            description="This server cannot switch a connection to a stream (it is not "
                        "p2prc's gunicorn server over HTTP/1.1).")


def switch(req: falcon.Request, resp: falcon.Response, take: Take,
           release: Callable[[], None] | None = None) -> None:
    """Answer 101 and have ``take`` run with the connection once the answer is sent;
    ``release`` runs after it, also when the connection broke before (see ``Held``)."""
    resp.status = falcon.HTTP_101
    resp.set_header("Connection", "Upgrade")
    resp.set_header("Upgrade", STREAM_PROTOCOL)
    req.env[ENV_KEY] = take
    req.env[ENV_KEY + ".release"] = release


@dataclass(frozen=True)
class Share:
    """At most ``most`` of a budget's slots held at once by one holder: a caller's key, a
    network, a node, or a group of callers (``holder`` names it in the answer). Beyond it:
    ``status`` (429: the caller's own use; 503: what it asks for is busy), with
    Retry-After."""

    holder: str
    most: int
    status: int = 429


class Held:
    """Requests that hold a gunicorn thread for long, of one kind (tunnels, relay polls,
    relayed streams, dial-backs), in this worker: at most ``limit`` at once, so that one kind
    never takes the threads of another nor of ordinary requests (gthread has a fixed number).
    Beyond it: 503 with Retry-After. ``Share``s bound what one holder may take of it."""

    def __init__(self, limit: int, name: str = "long-lived requests"):
        self.limit = max(1, limit)
        self.name = name  # what it holds, for the answers: "relayed streams"
        self.count = 0
        self._by_holder: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, what: str, shares: Sequence[Share] = ()) -> Callable[[], None]:
        """A slot, or 429/503; returns what gives it back (once, whatever calls it)."""
        with self._lock:
            for share in shares:
                if self._by_holder[share.holder] >= share.most:
                    raise self._beyond(share)
            if self.count >= self.limit:
                raise falcon.HTTPServiceUnavailable(
                    title="Busy", retry_after=RETRY_SECONDS,
                    description=f"This node carries {self.count} {self.name} per worker, its "
                                f"limit ({what}): try again shortly.")
            self.count += 1
            self._by_holder.update(share.holder for share in shares)
        given_back = False

        def release() -> None:
            nonlocal given_back
            with self._lock:
                if given_back:
                    return
                given_back = True
                self.count -= 1
                self._by_holder.subtract(share.holder for share in shares)
                for share in shares:
                    if self._by_holder[share.holder] <= 0:
                        del self._by_holder[share.holder]
        return release

    def opening(self, what: str, open_it: Callable[[], T], shares: Sequence[Share] = ()
                ) -> tuple[T, Callable[[], None]]:
        """A slot, then ``open_it()`` (the other end of a stream); the slot is given back at
        once if that fails, else by the returned function (``switch``'s ``release``)."""
        release = self.acquire(what, shares)
        try:
            return open_it(), release
        except BaseException:
            release()
            raise

    def _beyond(self, share: Share) -> falcon.HTTPError:
        description = (f"At most {share.most} {self.name} at once for {share.holder} here "
                       f"(in each worker), and they are taken: close one, or try again in a "
                       f"few seconds.")
        if share.status == 429:
            return falcon.HTTPTooManyRequests(title="Too many at once", description=description,
                                              retry_after=RETRY_SECONDS)
        return falcon.HTTPServiceUnavailable(title="Busy", description=description,
                                             retry_after=RETRY_SECONDS)


class Upgrades:
    """WSGI middleware: after the app answered 101 for a route that switched, run the
    route's function on the connection (in the request's own gunicorn thread)."""

    def __init__(self, app: Any):
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        result = self.app(environ, start_response)
        take: Take | None = environ.get(ENV_KEY)
        # gunicorn must not read another request from this connection afterwards (a stream
        # takes it; or the app said so, a 408): its response object (start_response is its
        # method) closes the connection. A Connection header would not: gunicorn drops it.
        force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
        if take is None:
            if environ.get(CLOSE_KEY) and force_close is not None:
                force_close()
            return result  # type: ignore[no-any-return]
        if hasattr(result, "close"):
            result.close()
        if force_close is not None:
            force_close()
        return _then(take, environ["gunicorn.socket"], environ.get(ENV_KEY + ".release"))


def keep(sock: socket.socket) -> None:
    """Mark a switched connection as handed on: when its request ends, gunicorn's side
    forgets it without closing it (``front._Conn.close``); whoever took it closes it."""
    setattr(sock, KEPT, True)


def _then(take: Take, sock: socket.socket,
          release: Callable[[], None] | None) -> Iterator[bytes]:
    kept = False
    try:
        yield b""  # gunicorn sends the 101 and its headers on the first write
        if getattr(sock, "deadline", None) is not None:
            sock.deadline = None  # type: ignore[attr-defined]  # a stream has its own rules
        kept = bool(take(sock))
    finally:  # also when the client left before the 101 went out
        if release is not None and not kept:
            release()


_worker: Any = None  # this process's gunicorn worker, set after it starts (see run.py)


def serving() -> bool:
    """False once this worker is stopping: long streams and polls end then."""
    return _worker is None or bool(getattr(_worker, "alive", True))


def set_worker(worker: Any) -> None:
    global _worker
    _worker = worker
