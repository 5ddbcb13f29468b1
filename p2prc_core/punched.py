"""The client's punched paths (issue 24): a node met through a relay, reached direct.

When a connection to a node would go through its relay, ``PunchedPaths.socket_to`` first
tries a direct path: it learns where its own UDP comes from (a UDP probe to the relay,
which answers those at its p2prc port), offers that to the node through the relay
(``POST /v1/punch``), punches (``punch.punch``), and runs QUIC on the path that opened
(``quic_link``). The link serves every later connection of this process to that node; a
link that died is punched again.

A pair that cannot punch (UDP blocked, symmetric NATs on both sides) costs at most
``BUDGET`` seconds, once per ``RETRY_SECONDS``: what became of each node's last try is kept
in ``punched.json`` in the home (``p2prc peers ls`` shows it as the path), and until then
its connections go through the relay at once.
"""

from __future__ import annotations

import atexit
import contextlib
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from p2prc_core import punch
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.storage import atomic_write_json, read_json_file, update_json

STATE_FILE = "punched.json"
BUDGET = 2.5  # seconds one try may take, from the first probe to QUIC's handshake (the
# issue's bound is 3 s for a pair that cannot punch, the relay's first answer included)
RETRY_SECONDS = 600.0  # after a failed try, the relay is used this long without one
MAX_REMEMBERED = 1024  # nodes kept in the file


_current: list[PunchedPaths] = []
_OPEN: weakref.WeakSet[PunchedPaths] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for paths in list(_OPEN):
        paths.close()


def use(paths: PunchedPaths) -> PunchedPaths:
    """Make ``paths`` this process's (what ``current`` gives: the streams of ``forward``,
    ``exec`` and the tunnel helper find it there); the one given."""
    _current[:] = [paths]
    return paths


def current() -> PunchedPaths | None:
    """This process's punched paths, or None where punching is off (``use``)."""
    return _current[0] if _current else None


def remembered(home: Path) -> dict[str, dict[str, Any]]:
    """``punched.json``: node id -> {"path": "punched" | "relay", "why", "at"}; entries
    of the wrong shape are left out."""
    try:
        found = read_json_file(home / STATE_FILE, {})
    except (OSError, ValueError):
        return {}  # damaged: what it said is tried again, and written afresh
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("at"), float)
            and v.get("path") in ("punched", "relay") and isinstance(v.get("why"), str)}


def punched_lately(home: Path) -> set[str]:
    """Nodes whose last try, within ``RETRY_SECONDS``, punched a path (``peers ls`` says
    ``punched`` for them, not ``relay``)."""
    now = time.time()
    return {node for node, last in remembered(home).items()
            if last["path"] == "punched" and now - last["at"] < RETRY_SECONDS}


class PunchedPaths:
    """This process's punched links, by node id (see the module's docstring)."""

    def __init__(self, home: Path | None, identity: NodeIdentity, secure: bool = True,
                 allow_loopback: bool = False, budget: float = BUDGET):
        self.home = home
        self.identity = identity
        self.secure = secure
        self.allow_loopback = allow_loopback
        self.budget = budget
        self._links: dict[str, Any] = {}  # node id -> quic_link.QuicLink
        self.last_error = ""  # why this process's last try did not punch
        self._lock = threading.Lock()
        _OPEN.add(self)  # closed at exit: its links' streams end cleanly, and quietly

    def socket_to(self, endpoint: Endpoint) -> socket.socket | None:
        """A connected socket to ``endpoint.node_id`` over a punched path (a relayed
        endpoint: the node's relay), or None: use the relay."""
        node = endpoint.node_id
        if node is None or endpoint.relay is None:
            return None
        with self._lock:  # one try per process at a time: the others wait for its link
            link = self._links.get(node)
            if link is None or not link.alive:
                if self._failed_lately(node):
                    return None
                try:
                    link = self._punch(endpoint)
                except (P2PRCError, OSError) as err:
                    self.last_error = str(err)
                    if not (isinstance(err, PeerRefused) and err.status == 429):
                        # (a 429 is "not now", not "never": the next command tries again)
                        self._remember(node, "relay", self.last_error)
                    return None
                self._links[node] = link
                self._remember(node, "punched", f"{link.remote[0]}:{link.remote[1]}")
        try:
            opened: socket.socket = link.open_socket()
        except PeerError:
            return None
        return opened

    def close(self) -> None:
        with self._lock:
            for link in self._links.values():
                link.close()
            self._links.clear()

    def _punch(self, endpoint: Endpoint) -> Any:
        from p2prc_core import udp_probe
        from p2prc_core.addresses import local_addresses
        from p2prc_core.client import PeerClient
        from p2prc_core.quic_link import QuicLink
        from p2prc_core.wire import PunchOffer

        assert endpoint.node_id is not None and endpoint.relay is not None
        deadline = time.monotonic() + self.budget
        sock = punch.udp_socket()
        try:
            port, seen = udp_probe.ask([(endpoint.host, endpoint.port, endpoint.relay)],
                                       self.identity, timeout=min(0.8, self.budget / 3),
                                       every=0.2, sock=sock)
            if not seen:
                raise PeerError(f"the relay at {endpoint.address} did not answer over UDP: "
                                f"UDP is blocked on the way")
            ours = [punch.candidate_text(s.address, s.port) for s in seen]
            ours += [punch.candidate_text(str(a.ip), port) for a in local_addresses()
                     if a.version == 4 and a.usable(self.allow_loopback)]
            ours = list(dict.fromkeys(ours))[:punch.MAX_CANDIDATES]
            token = punch.new_token()
            with PeerClient(endpoint, timeout=max(0.5, deadline - time.monotonic()),
                            identity=self.identity, secure=self.secure) as client:
                answer = client.punch(PunchOffer(token=token.hex(), candidates=ours))
            try:
                theirs = punch.parse_candidates(answer.candidates, self.allow_loopback)
            except punch.CandidateError as err:
                raise PeerError(f"{endpoint.node_id} answered the punch with {err}") from None
            found = punch.punch(sock, theirs, token,
                                seconds=min(answer.seconds or punch.SECONDS,
                                            max(0.1, deadline - time.monotonic())))
            if found is None:
                raise PeerError(
                    "no punch packet came through (theirs: "
                    f"{', '.join(punch.candidate_text(*c) for c in theirs)}; ours: "
                    f"{', '.join(ours)}): a NAT on the way keeps a mapping per "
                    f"destination, or drops UDP")
        except BaseException:
            sock.close()
            raise
        won, remote = found
        if won is not sock:  # a spread socket won: the first is not needed
            sock.close()
        link = QuicLink(won, remote, endpoint.node_id)  # owns the socket from here
        link.connect(max(1.0, deadline - time.monotonic()))  # a Retry costs a round trip
        return link

    def _failed_lately(self, node: str) -> bool:
        if self.home is None:
            return False
        last = remembered(self.home).get(node)
        return last is not None and last["path"] == "relay" and \
            time.time() - last["at"] < RETRY_SECONDS

    def _remember(self, node: str, path: str, why: str) -> None:
        if self.home is None:
            return

        def change(state: dict[str, Any]) -> None:
            state[node] = {"path": path, "why": why[:300], "at": time.time()}
            if len(state) > MAX_REMEMBERED:
                for old in sorted(state, key=lambda k: state[k].get("at", 0))[
                        :len(state) - MAX_REMEMBERED]:
                    del state[old]

        file = self.home / STATE_FILE
        try:
            update_json(file, change)
        except ValueError:  # damaged (not JSON, not an object): written afresh
            fresh: dict[str, Any] = {}
            change(fresh)
            with contextlib.suppress(OSError):
                atomic_write_json(file, fresh)
        except OSError:
            pass  # a read-only home: the next process tries again
