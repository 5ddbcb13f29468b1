"""A relay's side: nodes that cannot be dialled wait here, and clients are joined to them.

The flow, all of it on the relay's p2prc port (TLS), in plain HTTP requests:

1. A node behind NAT keeps one signed stream open, ``POST /v1/relay/listen`` (or, a node
   of an earlier version, a long poll: ``GET /v1/relay/wait``).
2. A client asks ``POST /v1/relay/connect?node=ID`` with ``Upgrade``. The relay picks a
   token, writes it to the node's stream (or answers its poll with it), and holds the
   client.
3. The node opens a second connection, ``POST /v1/relay/accept?token=T`` (signed, with
   ``Upgrade``), and the relay switches both to streams and joins them.
4. The client then speaks TLS to the node through the joined streams, checked against the
   node's id: the relay carries only ciphertext.

gunicorn runs several worker processes, and each step may land in another one. They meet
over abstract Unix sockets (Linux; no file, so no stale path and no length limit), found by
small marker files under ``$P2PRC_HOME/relay``: ``w.NODE.NAME.PID`` for a waiting node,
``c.PID.TOKEN`` for a joined connection (each counted against the limits while its process
lives).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from p2prc_core.errors import Refusal
from p2prc_core.wire import RELAY_TOKEN_BYTES, is_relay_token

TOKEN_BYTES = RELAY_TOKEN_BYTES
WAIT_SECONDS = 20.0  # a poll is answered at the latest after this (204: nothing came)
ACCEPT_SECONDS = 10.0  # how long a client is held for the node to come and accept
FIND_SECONDS = 3.0  # how long a client waits for the node's next poll to appear
SEEN_SECONDS = 30.0  # a node that polled this recently is still taken to be here
WAITS_PER_NODE = 2  # polls one node may hold open at once (one, and the next overlapping)
RETELLS = 2  # times a token lost with a node's stream is handed to its next one


class RelayRefusal(Refusal):
    title = "Relay refused"


def _abstract(name: str) -> str:
    return "\0p2prc-relay-" + name


class RelayHub:
    def __init__(self, home: Path, max_nodes: int, max_connections: int):
        self.dir = home / "relay"
        self.max_nodes = max_nodes
        self.max_connections = max_connections
        self._swept = 0.0  # when _seen last forgot the nodes that stopped

    # -- the node's poll -----------------------------------------------------------------

    def register(self, node_id: str, trusted: bool = False, stays: bool = False) -> Waiting:
        """A place for ``node_id`` to wait at: where connects from any worker find it. A
        node the relay's owner trusts may wait beyond ``max_nodes``: strangers' keys (free
        to make) cannot fill the relay for it. ``stays``: a node's stream, which outlives the
        tokens handed to it (a poll ends with its first), so its end before the accept means
        the token was lost with it (``connect`` hands it again).

        :raises RelayRefusal: 429 the node waits here ``WAITS_PER_NODE`` times already; 503
            the relay holds ``max_nodes`` nodes.
        """
        self.dir.mkdir(exist_ok=True)
        if len(self._waits(node_id)) >= WAITS_PER_NODE:
            raise RelayRefusal(f"Node {node_id} already waits here {WAITS_PER_NODE} times: "
                               f"one poll at a time.", 429, "Already waiting")
        waiting = self.waiting_nodes()
        if not trusted and node_id not in waiting and len(waiting) >= self.max_nodes:
            raise RelayRefusal(f"This relay holds {len(waiting)} nodes, its limit: try "
                               f"another relay.", 503, "Relay full")
        name = ("s" if stays else "") + secrets.token_hex(8)
        self._seen(node_id)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(_abstract(name))
            listener.listen(8)
        except BaseException:
            listener.close()
            raise
        marker = self.dir / f"w.{node_id}.{name}.{os.getpid()}"  # (a dead worker's: gone)
        marker.touch()
        return Waiting(self, node_id, listener, marker)

    def wait(self, node_id: str, seconds: float = WAIT_SECONDS,
             alive: Callable[[], bool] = lambda: True,
             gone: Callable[[], bool] = lambda: False, trusted: bool = False) -> str | None:
        """Wait (a long poll, in this thread) for a client for ``node_id``; the token for
        its ``accept``, or None. Ends at once when ``gone()`` says the node's poll went away
        (it restarted, say), so no client is handed to a poll nobody reads."""
        waiting = self.register(node_id, trusted)
        try:
            waiting.listener.settimeout(0.5)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and alive() and not gone():
                got = waiting.take()
                if got is None:
                    continue
                conn, token = got
                with conn:
                    if not gone():
                        conn.sendall(b"ok")
                        return token
            return None
        finally:
            waiting.close()

    def waiting_nodes(self) -> set[str]:
        return {node_id for node_id, _ in self._waits()}

    def _waits(self, node_id: str | None = None) -> list[tuple[str, str]]:
        """The places where nodes (or ``node_id``) wait now: (node id, listener name). A
        place whose worker died (killed, out of memory) is forgotten here."""
        return [(node, name) for node, name, _ in self._places(node_id)]

    def _places(self, node_id: str | None = None) -> list[tuple[str, str, Path]]:
        """``_waits``, each with its marker."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                parts = entry.name.split(".")
                if len(parts) != 4 or parts[0] != "w" or (node_id and parts[1] != node_id):
                    continue
                if parts[3].isdigit() and not _alive(int(parts[3])):
                    Path(entry.path).unlink(missing_ok=True)
                    continue
                found.append((parts[1], parts[2], Path(entry.path)))
        return found

    def _seen(self, node_id: str) -> None:
        """Note that ``node_id`` polled now (see ``known``); forget those that stopped (a
        look through the folder at most every ``SEEN_SECONDS``: a relay holds many)."""
        (self.dir / f"s.{node_id}").touch()
        now = time.time()
        if now - self._swept < SEEN_SECONDS:
            return
        self._swept = now
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith("s.") and now - entry.stat().st_mtime > SEEN_SECONDS:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def known(self, node_id: str) -> bool:
        """Whether ``node_id`` waits here, or did a moment ago: between two polls (one
        taken by a client, the next not yet come) a node waits nowhere for an instant, and
        a client that comes then is not turned away (``connect`` waits for the next)."""
        if node_id in self.waiting_nodes():
            return True
        try:
            seen = (self.dir / f"s.{node_id}").stat().st_mtime
        except FileNotFoundError:
            return False
        return time.time() - seen < SEEN_SECONDS

    # -- the client's connect ------------------------------------------------------------

    def connect(self, node_id: str) -> socket.socket:
        """A stream to ``node_id`` through this relay (the node's accept, joined).

        :raises RelayRefusal: 404 the node does not wait here; 504 it did not come to
            accept; 503 the relay carries as many connections as it may.
        """
        if self.connections() >= self.max_connections:
            raise RelayRefusal(f"This relay carries {self.max_connections} connections, its "
                               f"limit: try again later.", 503, "Relay busy")
        token = secrets.token_hex(TOKEN_BYTES)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(_abstract(f"t-{node_id}-{token}"))
            listener.listen(1)
            told = self._tell(node_id, token, FIND_SECONDS)
            if told is None:
                raise RelayRefusal(f"Node {node_id} does not keep a connection to this "
                                   f"relay.", 404, "Not relayed here")
            deadline = time.monotonic() + ACCEPT_SECONDS
            cap = deadline + ACCEPT_SECONDS / 2  # the most that handing it again may add
            again = RETELLS
            while True:
                listener.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise RelayRefusal(f"Node {node_id} was told, but did not come to "
                                           f"accept in time ({ACCEPT_SECONDS:g} s).", 504,
                                           "Node did not answer") from None
                    if not _lost(told):
                        continue
                    # The node's stream ended with the token in it (its process was killed,
                    # say): its next stream gets it; else, or after RETELLS, a 404 now.
                    told = self._tell(node_id, token,
                                      min(FIND_SECONDS, cap - time.monotonic())) \
                        if again else None
                    again -= 1
                    if told is None:
                        came = _came(listener)  # (it may have come while it was told again)
                        if came is not None:
                            return came
                        raise RelayRefusal(f"Node {node_id} was told, but its connection "
                                           f"to this relay ended before it came to "
                                           f"accept.", 404, "Not relayed here") from None
                    deadline = min(cap, max(deadline, time.monotonic() + ACCEPT_SECONDS / 2))
                    continue
                if _ours(conn):
                    return conn
                conn.close()  # another user's process on this machine: not the node

    def _tell(self, node_id: str, token: str, seconds: float) -> Path | None:
        """Hand ``token`` to one of the node's waiting polls (its next one, if it is just
        between two), trying for ``seconds``; the marker of the one that took it, or
        None."""
        deadline = time.monotonic() + seconds
        while True:
            for _, name, marker in sorted(self._places(node_id)):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(2.0)
                    try:
                        conn.connect(_abstract(name))
                        conn.sendall(token.encode() + b"\n")
                        if conn.recv(2) == b"ok":
                            return marker
                    except OSError:
                        continue
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    # -- the node's accept ---------------------------------------------------------------

    def accept(self, node_id: str, token: str) -> socket.socket:
        """The client connection that ``token`` was made for; only ``node_id`` can take it.

        :raises RelayRefusal: 404 no such token for this node (used, expired or another's).
        """
        if not is_relay_token(token):
            raise RelayRefusal("A relay token is 32 lower-case hex characters.", 400,
                               "Invalid token")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(_abstract(f"t-{node_id}-{token}"))
        except OSError:
            conn.close()
            raise RelayRefusal("No client waits for this token (it was used, it expired, or "
                               "it is another node's).", 404, "Unknown token") from None
        return conn

    # -- the limits ----------------------------------------------------------------------

    def count(self) -> Callable[[], None]:
        """Count a joined connection against ``max_connections`` until the returned
        function is called (its worker's end counts as called)."""
        self.dir.mkdir(exist_ok=True)
        marker = self.dir / f"c.{os.getpid()}.{secrets.token_hex(8)}"
        marker.touch()
        return lambda: marker.unlink(missing_ok=True)

    def connections(self) -> int:
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                parts = entry.name.split(".")
                if len(parts) == 3 and parts[0] == "c" and parts[1].isdigit():
                    if _alive(int(parts[1])):
                        count += 1
                    else:
                        Path(entry.path).unlink(missing_ok=True)  # its worker died
        return count


class Waiting:
    """One node's place at the relay (``RelayHub.register``): the Unix listener where a
    client's connect, in any worker, hands it a token (``RelayHub._tell``), and the marker
    that lets them find it. ``close`` gives it up."""

    def __init__(self, hub: RelayHub, node_id: str, listener: socket.socket, marker: Path):
        self.hub = hub
        self.node_id = node_id
        self.listener = listener
        self.marker = marker

    def take(self) -> tuple[socket.socket, str] | None:
        """The next connect's connection and the token it brings, if one comes now (within
        the listener's timeout, or at once when it does not block); the caller answers
        ``b"ok"`` on it once the node has the token, then closes it."""
        try:
            conn, _ = self.listener.accept()
        except (TimeoutError, BlockingIOError):
            return None
        if not _ours(conn):
            conn.close()
            return None
        token = _read_token(conn)  # our own worker writes it at once: a short wait at most
        if token is None:
            conn.close()
            return None
        return conn, token

    def seen(self) -> None:
        """The node is still here (``RelayHub.known``)."""
        with contextlib.suppress(OSError):
            self.hub._seen(self.node_id)

    def close(self) -> None:
        self.marker.unlink(missing_ok=True)
        self.listener.close()


def _lost(marker: Path) -> bool:
    """Whether the node's stream whose ``marker`` took a token ended (its marker gone, or
    its worker): a poll ends as it is answered, so only a stream's end (a name registered
    with ``stays``) says the token went with it."""
    _, _, name, pid = marker.name.split(".")
    return name.startswith("s") and (not marker.exists() or
                                     (pid.isdigit() and not _alive(int(pid))))


def _came(listener: socket.socket) -> socket.socket | None:
    """The node's accept, if it is already waiting at ``listener``."""
    listener.settimeout(0.0)
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, TimeoutError):
        return None
    if _ours(conn):
        return conn
    conn.close()
    return None


def _read_token(conn: socket.socket) -> str | None:
    conn.settimeout(2.0)
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) <= 2 * TOKEN_BYTES:
            block = conn.recv(64)
            if not block:
                return None
            data += block
    except OSError:
        return None
    token = data.strip().decode("ascii", "replace")
    if is_relay_token(token):
        return token
    return None


def _ours(conn: socket.socket) -> bool:
    """Whether the other end of a Unix socket runs as this user (abstract sockets have no
    file permissions: any local user could connect)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
