"""A node's side of its relay (the relay's side: ``server.relay`` and
``server.relay_listen``): one stream on which the relay says when a client comes
(``open_listen``, ``Tokens``), and a stream per client, accepted (``open_accept``)."""

from __future__ import annotations

import socket
import time
from collections import deque

from p2prc_core import tls
from p2prc_core.errors import PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.signing import sign_request
from p2prc_core.splice import no_delay
from p2prc_core.upgrade_client import upgrade_sync
from p2prc_core.wire import LISTEN_KEEPALIVE_SECONDS, RelayWait, WireError, decode

SILENCE_SECONDS = 3 * LISTEN_KEEPALIVE_SECONDS  # nothing for this long: the relay is gone
MAX_LINE = 1024  # a token's line is about 50 bytes
MAX_EMPTY = 64  # empty lines in one wait: a relay keeps alive with one every 15 s


def open_stream(relay: Endpoint, path: str, query: str, identity: NodeIdentity, secure: bool,
                timeout: float) -> tuple[socket.socket, bytes]:
    """A connection to ``relay`` (checked as its node over TLS), switched to a stream by a
    signed ``POST path?query``; the socket, and what came after the 101.

    :raises PeerRefused: the relay answered otherwise (404 from a relay without ``path``).
    :raises PeerError: it could not be reached, or did not answer as p2prc.
    """
    sock = no_delay(socket.create_connection((relay.host, relay.port), timeout=timeout))
    if secure:
        try:
            sock = tls.client_context().wrap_socket(sock)
            tls.check_peer(sock, relay.node_id, f"relay {relay}")
        except BaseException:
            sock.close()
            raise
    headers = sign_request(identity, "POST", path, query, b"", relay.node_id or "")
    try:
        leftover = upgrade_sync(lambda: sock.recv(65536), sock.sendall, f"relay {relay}",
                                f"{path}?{query}" if query else path, relay.address, headers)
    except BaseException:
        sock.close()
        raise
    return sock, leftover


def open_accept(relay: Endpoint, token: str, identity: NodeIdentity, secure: bool,
                timeout: float) -> socket.socket:
    """A connection to ``relay``, upgraded to carry the relayed client ``token`` names."""
    sock, leftover = open_stream(relay, "/v1/relay/accept", f"token={token}", identity,
                                 secure, timeout)
    if leftover:
        sock.close()
        raise PeerError(f"relay {relay} sent bytes before the client could")
    return sock


def open_listen(relay: Endpoint, identity: NodeIdentity, secure: bool,
                timeout: float) -> Tokens:
    """This node's one stream to ``relay``, where it hears of each client (``Tokens``).

    :raises PeerRefused: 404 from a relay of an earlier version (it has only the long poll,
        ``PeerClient.relay_wait``), or a refusal (403, 429, 503).
    """
    sock, leftover = open_stream(relay, "/v1/relay/listen", "", identity, secure, timeout)
    return Tokens(sock, leftover, f"relay {relay}")


class Tokens:
    """The tokens a relay sends on a listening stream, one line each (``wire.RelayWait``);
    empty lines keep it alive."""

    def __init__(self, sock: socket.socket, leftover: bytes, where: str):
        self.sock = sock
        self.lines: deque[bytes] = deque()
        self.partial = b""
        self.where = where
        self.heard = time.monotonic()
        self._take(leftover)

    def _take(self, data: bytes) -> None:
        """Split what came into whole lines (each byte looked at once: a relay may send
        many lines at a time) and the start of the next."""
        *whole, self.partial = (self.partial + data).split(b"\n")
        self.lines.extend(whole)
        if len(self.partial) > MAX_LINE:
            raise PeerError(f"{self.where} sent a line over {MAX_LINE} bytes")

    def next(self, wait: float) -> str | None:
        """The next client's token, or None when none came within ``wait`` seconds.

        :raises PeerError: the relay closed the stream, said nothing for
            ``SILENCE_SECONDS``, sent something that is not a token's line, or empty lines
            faster than keepalives come.
        """
        deadline = time.monotonic() + wait
        empty = 0
        while True:
            while self.lines:
                line = self.lines.popleft()
                self.heard = time.monotonic()
                if not line.strip():
                    empty += 1
                    if empty > MAX_EMPTY:  # not keepalives: a relay that keeps us busy
                        raise PeerError(f"{self.where} sends empty lines without end")
                else:
                    try:
                        return decode(line, RelayWait).token
                    except WireError as err:
                        raise PeerError(f"{self.where} sent a line that is not a client's "
                                        f"token ({err})") from None
            if time.monotonic() - self.heard > SILENCE_SECONDS:
                raise PeerError(f"{self.where} said nothing for {SILENCE_SECONDS:g} s")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError as err:
                raise PeerError(f"{self.where}: {err}") from None
            if not data:
                raise PeerError(f"{self.where} closed the listening stream")
            self._take(data)

    def close(self) -> None:
        self.sock.close()
