"""Speed-test transfers over a plain socket (TLS-wrapped and checked, see ``channel``).

A speed test measures the path to a peer, not an HTTP library: a general client parses and
copies every 64 KiB block, which on a fast link costs more than the link itself. This module
speaks just the HTTP/1.1 that the speed-test routes need (one request, a Content-Length
body, connection closed) and receives straight into one reused buffer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from p2prc_core.channel import Channel
from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.models import Endpoint, loads_strict
from p2prc_core.text import clean, seconds_text

Progress = Callable[[int], None]
_BUFFER = 4 << 20
_PROGRESS_EVERY = 8 << 20
_MAX_HEAD = 64 << 10


class _Response:
    def __init__(self, status: int, headers: dict[str, str], leftover: bytes):
        self.status, self.headers, self.leftover = status, headers, leftover


def _connect(channel: Channel, timeout: float) -> socket.socket:
    sock = channel.connect(timeout)  # TLS, the peer's key checked before anything is sent
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
    return sock


def _request_head(method: str, endpoint: Endpoint, target: str, length: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {endpoint}", "User-Agent: p2prc",
             "Connection: close"]
    if length is not None:
        lines += [f"Content-Length: {length}", "Content-Type: application/octet-stream"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _read_head(sock: socket.socket, endpoint: Endpoint, timeout: float) -> _Response:
    """The answer's head, whole within ``timeout`` (a peer may drip it a byte at a time:
    each read waits only for what is left); the socket keeps ``timeout`` per read after."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerError(f"{endpoint} did not finish its answer within "
                            f"{seconds_text(timeout)} (it sent it too slowly)")
        sock.settimeout(min(timeout, left))
        block = sock.recv(_MAX_HEAD)
        if not block:
            raise PeerError(f"{endpoint} closed the connection without an answer")
        data += block
        if len(data) > _MAX_HEAD and b"\r\n\r\n" not in data:
            raise PeerError(f"{endpoint} sent an oversized header: not a p2prc node?")
    sock.settimeout(timeout)
    head, _, leftover = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or \
            not (parts[1].isascii() and parts[1].isdigit()):
        raise PeerError(f"{endpoint} is not an HTTP server (is the port right?)")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        raise PeerError(f"{endpoint} sent a malformed Content-Length: not a p2prc node?")
    return _Response(int(parts[1]), headers, leftover)


def _read_small_body(sock: socket.socket, response: _Response, limit: int = 1 << 20) -> bytes:
    body = response.leftover
    length = int(response.headers.get("content-length", limit))
    while len(body) < min(length, limit):
        block = sock.recv(65536)
        if not block:
            break
        body += block
    return body[:length]


def _fail(endpoint: Endpoint, response: _Response, sock: socket.socket) -> PeerError:
    body = _read_small_body(sock, response)
    try:
        error = loads_strict(body)
        detail = clean(f"{error['title']}: {error['description']}", 500)
    except (ValueError, KeyError, TypeError):
        return PeerError(f"{endpoint} answered HTTP {response.status}, and not as a p2prc node")
    return PeerRefused(f"{endpoint} refused ({response.status}): {detail}", response.status)


def download(channel: Channel, size: int, timeout: float,
             progress: Progress | None = None) -> float:
    """Receive ``size`` bytes from the peer's download route; returns the seconds taken."""
    endpoint = channel.endpoint
    started = time.perf_counter()
    with _connect(channel, timeout) as sock:
        try:
            sock.sendall(_request_head("GET", endpoint, f"/v1/speedtest/download?bytes={size}",
                                       None))
            response = _read_head(sock, endpoint, timeout)
            if response.status != 200:
                raise _fail(endpoint, response, sock)
            if int(response.headers.get("content-length", -1)) != size:
                raise PeerError(f"{endpoint} offered a body of another size than {size}")
            received = len(response.leftover)
            pending = received
            buffer = memoryview(bytearray(_BUFFER))
            while received < size:
                count = sock.recv_into(buffer, min(_BUFFER, size - received))
                if not count:
                    raise PeerError(f"{endpoint} closed the connection after {received} "
                                    f"of {size} bytes")
                received += count
                pending += count
                if progress and pending >= _PROGRESS_EVERY:
                    progress(pending)
                    pending = 0
        except TimeoutError:
            raise PeerError(f"{endpoint} stopped sending for {timeout:g} s") from None
        except OSError as err:
            raise PeerError(f"the connection to {endpoint} broke: {err}") from None
    seconds = time.perf_counter() - started
    if progress and pending:
        progress(pending)
    return seconds


def upload(channel: Channel, size: int, timeout: float,
           progress: Progress | None = None) -> tuple[float, dict[str, Any]]:
    """Send ``size`` bytes to the peer's upload route; returns the seconds and its answer."""
    endpoint = channel.endpoint
    block = memoryview(os.urandom(min(_BUFFER, max(size, 1))))
    started = time.perf_counter()
    with _connect(channel, timeout) as sock:
        try:
            sock.sendall(_request_head("POST", endpoint, "/v1/speedtest/upload", size))
            left = size
            while left > 0:
                piece = block[:min(left, len(block))]
                sock.sendall(piece)
                left -= len(piece)
                if progress:
                    progress(len(piece))
            response = _read_head(sock, endpoint, timeout)
            if response.status != 200:
                raise _fail(endpoint, response, sock)
            body = _read_small_body(sock, response)
        except TimeoutError:
            raise PeerError(f"{endpoint} stopped reading for {timeout:g} s") from None
        except OSError as err:
            raise PeerError(f"the connection to {endpoint} broke: {err}") from None
    seconds = time.perf_counter() - started
    try:
        reply: dict[str, Any] = loads_strict(body)
    except ValueError:
        raise PeerError(f"{endpoint} answered the upload, but not as a p2prc node") from None
    return seconds, reply
