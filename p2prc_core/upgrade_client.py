"""The client's half of an HTTP/1.1 Upgrade to a byte stream (the server's is
``server.upgrade``), spoken with h11 over a connection already open: sync over an httpcore
stream, or async over asyncio streams. Used to pass through a relay and to open a tunnel
into a container."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import h11

from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.models import loads_strict
from p2prc_core.text import clean, seconds_text
from p2prc_core.wire import STREAM_PROTOCOL

_MAX_ANSWER = 64 << 10


def _request(target: str, host: str, headers: dict[str, str]) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_ANSWER)
    fields = [("Host", host), ("User-Agent", "p2prc"), ("Connection", "Upgrade"),
              ("Upgrade", STREAM_PROTOCOL), ("Content-Length", "0"), *headers.items()]
    data = conn.send(h11.Request(method="POST", target=target, headers=fields))
    data += conn.send(h11.EndOfMessage())
    return conn, data


def _interpret(conn: h11.Connection, where: str, feed: Callable[[], bytes]) -> bytes:
    """Read the answer; return what came after the 101 (the stream's first bytes).

    :raises PeerRefused: the server answered with an error (its title and description).
    :raises PeerError: it did not answer as HTTP.
    """
    status = 0
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = feed()
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SWITCHED_PROTOCOL:
                    raise PeerError(f"{where} closed the connection without an answer")
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                trailing, _ = conn.trailing_data
                return bytes(trailing)
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
    (normally none) are returned. The whole answer must come within ``timeout``."""
    conn, data = _request(target, host, headers or {})
    write(data)
    deadline = time.monotonic() + timeout

    def read_in_time() -> bytes:
        if time.monotonic() > deadline:
            raise PeerError(f"{where} did not finish its answer within {seconds_text(timeout)}")
        return read()

    return _interpret(conn, where, read_in_time)


async def upgrade_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        where: str, target: str, host: str,
                        headers: dict[str, str] | None = None,
                        timeout: float = 10.0) -> bytes:
    conn, data = _request(target, host, headers or {})
    writer.write(data)
    await writer.drain()
    # h11 pulls; asyncio pushes: read the head here (an answer is small), then let h11 parse.
    buffered = bytearray()
    try:
        async with asyncio.timeout(timeout):  # the whole answer: a peer may drip it
            while True:
                chunk = await reader.read(65536)
                buffered += chunk
                if not chunk or b"\r\n\r\n" in buffered:
                    head_end = buffered.find(b"\r\n\r\n")
                    if head_end >= 0 and buffered.startswith(b"HTTP/1.1 101"):
                        break
                    if not chunk or len(buffered) > _MAX_ANSWER or \
                            _complete(bytes(buffered)):
                        break
    except TimeoutError:
        raise PeerError(f"{where} did not finish its answer within {seconds_text(timeout)} "
                        f"(it sent it too slowly, or not at all)") from None
    pending = [bytes(buffered)]

    def feed() -> bytes:
        return pending.pop() if pending else b""

    return _interpret(conn, where, feed)


def _complete(data: bytes) -> bool:
    """Whether an error answer (head and Content-Length body) is all here."""
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False
