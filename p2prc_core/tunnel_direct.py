"""The tunnel helper's quick way to a host: one direct path, a blocking socket for the
handshake and one ``select`` loop for the bytes, with nothing of asyncio (whose import alone
takes longer than the whole connection). Relays, and any path after the first, go the
asyncio way (``tunnel_streams``), where TLS inside a relay's TLS is safe."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import time

from p2prc_core import tls
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.signing import sign_request
from p2prc_core.upgrade_client import upgrade_sync

# A first path that does not even take a TCP connection within this goes the slower way
# (all paths, in the table's order, each with the whole timeout): the host may have moved.
CONNECT_SECONDS = 2.0
CHUNK = 1 << 16


def connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    """A TCP connection to ``endpoint``.

    :raises OSError: it cannot be made within ``min(timeout, CONNECT_SECONDS)``.
    """
    sock = socket.create_connection((endpoint.host, endpoint.port),
                                    min(timeout, CONNECT_SECONDS))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


def upgrade(sock: socket.socket, endpoint: Endpoint, identity: NodeIdentity, path: str,
            query: str, timeout: float, secure: bool) -> tuple[socket.socket, bytes]:
    """TLS with the host's key checked, then the signed upgrade of ``path?query``: the
    stream's socket and its first bytes. ``sock`` is closed on failure.

    :raises PeerError: (PeerRefused, tls.NodeMismatch) as ``tunnel_streams.open_stream``;
        OSError, ssl.SSLError: the connection broke or timed out.
    """
    try:
        if secure:
            sock = tls.client_context().wrap_socket(sock)
            tls.check_peer(sock, endpoint.node_id, endpoint)
        headers = sign_request(identity, "POST", path, query, b"", endpoint.node_id or "")
        first = upgrade_sync(lambda: sock.recv(CHUNK), sock.sendall, str(endpoint),
                             f"{path}?{query}", endpoint.address, headers, timeout)
    except BaseException:
        sock.close()
        raise
    return sock, first


def carry(sock: socket.socket, first: bytes, stdin: int, stdout: int,
          linger: float = 1.0) -> None:
    """Bytes from ``stdin`` to ``sock`` and from ``sock`` to ``stdout`` until the far end
    closes, or ``stdin`` does (then what the far end still sends for ``linger`` seconds is
    delivered); the socket is closed at the end. A broken connection ends it quietly, as a
    closed one does (OpenSSH says what it saw)."""
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError), sock:
        _write(stdout, first)
        sock.setblocking(False)
        outgoing = b""  # read from stdin, not yet taken by the socket
        stdin_open = True
        stop_at: float | None = None
        readable = True  # TLS may hold bytes already read from the socket: read first
        while True:
            if readable and not _drain(sock, stdout):
                return  # the far end closed
            if outgoing:
                outgoing = outgoing[_send(sock, outgoing):]
            if not stdin_open and not outgoing and stop_at is None:
                stop_at = time.monotonic() + linger
            wait = None if stop_at is None else stop_at - time.monotonic()
            if wait is not None and wait <= 0:
                return
            readers: list[int | socket.socket] = [sock]
            if stdin_open and not outgoing:
                readers.append(stdin)
            ready, _, _ = select.select(readers, [sock] if outgoing else [], [], wait)
            readable = sock in ready
            if stdin in ready:
                outgoing = os.read(stdin, CHUNK)
                stdin_open = bool(outgoing)


def _drain(sock: socket.socket, stdout: int) -> bool:
    """Everything ``sock`` has now to ``stdout``; False once the far end has closed."""
    while True:
        try:
            data = sock.recv(CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return True
        if not data:
            return False
        _write(stdout, data)


def _send(sock: socket.socket, data: bytes) -> int:
    """As much of ``data`` as ``sock`` takes now (TLS takes a record whole or not at all:
    the same bytes are offered again until it does)."""
    try:
        return sock.send(data)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return 0


def _write(out: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(out, view):]
        except BlockingIOError:
            select.select([], [out], [])
