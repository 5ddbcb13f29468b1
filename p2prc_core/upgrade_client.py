"""The client's half of an HTTP/1.1 Upgrade to a byte stream (the server's is
``server.upgrade``), over a connection already open: sync (any read and write, as over an
httpcore stream or a socket), or async over asyncio streams. Used to pass through a relay,
to open a tunnel into a container and to run a command in one.

The request is written here and a 101 read here; any other answer (a refusal, or something
that is not HTTP) is read by h11, loaded only then: a tunnel helper starts on every new SSH
connection, and h11's import costs it more than the whole exchange."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.models import STREAM_PROTOCOL
from p2prc_core.text import seconds_text

if TYPE_CHECKING:
    import asyncio

_MAX_ANSWER = 64 << 10
_SWITCHED = b"HTTP/1.1 101"  # then a space and a reason phrase, or the line's end


def request_bytes(target: str, host: str, headers: dict[str, str]) -> bytes:
    """The upgrade request for ``target``, signed by ``headers``.

    :raises ValueError: a word that cannot go into a request line or header as it is.
    """
    fields = [("Host", host), ("User-Agent", "p2prc"), ("Connection", "Upgrade"),
              ("Upgrade", STREAM_PROTOCOL), ("Content-Length", "0"), *headers.items()]
    words = [target, *(word for field in fields for word in field)]
    if not all(word and word.isascii() and word.isprintable() and word == word.strip()
               for word in words) or " " in target or any(":" in name for name, _ in fields):
        raise ValueError("an upgrade request with a word that is not printable ASCII")
    lines = [f"POST {target} HTTP/1.1", *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _enough(data: bytes) -> bool:
    """Whether the answer so far can be read: a whole 101 head, a whole error answer (head
    and Content-Length body), or more than any answer may be."""
    if _switched(data) and b"\r\n\r\n" in data:
        return True
    return len(data) > _MAX_ANSWER or _complete(data)


def _switched(data: bytes) -> bool:
    """Whether ``data`` starts with a 101's status line (``HTTP/1.1 101`` alone on its line,
    or with a reason phrase)."""
    return data.startswith(_SWITCHED) and data[len(_SWITCHED):len(_SWITCHED) + 1] in (b" ",
                                                                                   b"\r")


def _complete(data: bytes) -> bool:
    """Whether an error answer (head and Content-Length body) is all here."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False  # a Content-Length seen so far may be followed by more of the head
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            digits = value.strip()
            if not digits.isdigit() or len(digits) > 20:
                return True  # no answer's length: h11 says so ("bad Content-Length")
            return len(body) >= int(digits)
    return False


def _answer(data: bytes, closed: bool, where: str, target: str, host: str) -> bytes:
    """What came after the 101 (the stream's first bytes).

    :raises PeerRefused: the server answered with an error (its title and description).
    :raises PeerError: it did not answer as HTTP, or not at all.
    """
    if _switched(data):
        head, found, rest = data.partition(b"\r\n\r\n")
        if found:
            return rest
    return _refusal(data, closed, where, target, host)


def _refusal(data: bytes, closed: bool, where: str, target: str, host: str) -> bytes:
    """Any answer but a 101, read by h11 (see the module's note): always raises. ``closed``:
    the server closed the connection after ``data`` (else reading stopped at the limit)."""
    if not data:
        raise PeerError(f"{where} closed the connection without an answer")
    import h11

    from p2prc_core.models import loads_strict
    from p2prc_core.text import clean

    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_ANSWER)
    conn.send(h11.Request(method="POST", target=target, headers=[("Host", host),
                                                                 ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if closed:
        conn.receive_data(b"")
    status = 0
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:  # more than an answer may be: read what came
                if status:
                    break
                raise PeerError(f"{where} did not answer as an HTTP server (its answer's "
                                f"head is longer than {_MAX_ANSWER >> 10} KiB)")
            if isinstance(event, h11.InformationalResponse):
                raise PeerError(f"{where} answered {event.status_code} instead of switching "
                                f"to a stream")
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_ANSWER:
                    break
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    except h11.RemoteProtocolError as err:
        raise PeerError(f"{where} did not answer as an HTTP server: {err}") from None
    if status < 400:
        raise PeerError(f"{where} answered HTTP {status} instead of switching to a stream "
                        f"(not p2prc, or an older one)")
    try:
        error = loads_strict(body)
        detail = clean(f"{error['title']}: {error['description']}", 500)
    except (ValueError, KeyError, TypeError):
        detail = f"HTTP {status}"
    raise PeerRefused(f"{where} refused ({status}): {detail}", status)


def upgrade_sync(read: Callable[[], bytes], write: Callable[[bytes], None], where: str,
                 target: str, host: str, headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> bytes:
    """Ask for ``target`` as a stream over an open connection; the stream's first bytes
    (normally none) are returned. The whole answer must come within ``timeout`` (each
    ``read`` is bounded by the connection's own timeout)."""
    write(request_bytes(target, host, headers or {}))
    deadline = time.monotonic() + timeout
    buffered, closed = b"", False
    while not closed and not _enough(buffered):
        if time.monotonic() > deadline:
            raise PeerError(f"{where} did not finish its answer within {seconds_text(timeout)}")
        chunk = read()
        closed = not chunk
        buffered += chunk
    return _answer(buffered, closed, where, target, host)


async def upgrade_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        where: str, target: str, host: str,
                        headers: dict[str, str] | None = None,
                        timeout: float = 10.0) -> bytes:
    import asyncio

    writer.write(request_bytes(target, host, headers or {}))
    await writer.drain()
    buffered, closed = b"", False
    try:
        async with asyncio.timeout(timeout):  # the whole answer: a peer may drip it
            while not closed and not _enough(buffered):
                chunk = await reader.read(65536)
                closed = not chunk
                buffered += chunk
    except TimeoutError:
        raise PeerError(f"{where} did not finish its answer within {seconds_text(timeout)} "
                        f"(it sent it too slowly, or not at all)") from None
    return _answer(buffered, closed, where, target, host)
