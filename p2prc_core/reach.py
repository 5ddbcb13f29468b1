"""How others reach this node, kept up by the running server: the dial ladder's server side.

One worker at a time (a lock in the home) runs the ``ReachAgent``:

1. **Port mapping**: ask the home router to forward the server's port (UPnP IGD, else
   NAT-PMP or PCP), renew the mapping, remove it on stop (``router_port.RouterPort``); the
   external address goes into the signed record.
2. **Relay**: keep a connection to a relay (``relays``, or a peer that offers to relay), so
   that clients can reach this node through it; the relay goes into the signed record.
   If the relay goes away, move to the next one.
3. **Dial-back**: ask a peer to dial this node back. Reachable, and ``use_relay = "auto"``:
   the relay is dropped. It is asked again now and then.

What it found is in ``$P2PRC_HOME/reach.json``, read by the record and ``p2prc status``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from p2prc_core.addresses import own_server
from p2prc_core.config import Settings
from p2prc_core.directory import PeerDirectory
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.models import Endpoint, parse_endpoint
from p2prc_core.reach_state import ReachState
from p2prc_core.relay_client import open_accept, open_listen
from p2prc_core.relayhub import WAIT_SECONDS
from p2prc_core.router_port import RouterPort
from p2prc_core.splice import no_delay, process_loop
from p2prc_core.wire import to_builtins

log = logging.getLogger("p2prc.reach")

CHECK_SECONDS = 120.0  # how often reachability is asked again
RETRY_SECONDS = 2.0  # after a relay failed, before the next try
FAILURES_BEFORE_MOVING = 2  # failed polls in a row before another relay is tried
MAX_SETTING_UP = 16  # relayed clients being accepted at once (a thread each, briefly)
MAX_CARRIED = 256  # relayed clients joined at once: one loop carries them, four descriptors
# each (the relay's end and this server's)


class ReachAgent:
    """Keeps this node reachable (see the module's docstring), through ``peers``."""

    def __init__(self, settings: Settings, home: Path, peers: PeerDirectory):
        self.peers = peers
        self.home = home
        self.settings = settings
        self.identity = peers.identity
        self.state = ReachState(home)
        self._stop = threading.Event()
        # Clients taken from a relay at once: a relay that hands out tokens without end
        # must not make this node open connections without end. Each is accepted on a
        # thread of its own (MAX_SETTING_UP at once), then joined to this node's server by
        # one loop, as the server carries its tunnels (MAX_CARRIED at once): kept SSH
        # sessions (ControlPersist) through a relay hold no thread. On this node's server a
        # relayed client holds a thread only while a request or an exec stream of its runs.
        self._setting_up = threading.BoundedSemaphore(MAX_SETTING_UP)
        self._carried = threading.BoundedSemaphore(MAX_CARRIED)
        self._left_waiting = 0  # clients a relay told of while the limits were reached
        self._lock_fd: int | None = None
        self.router = RouterPort(self.state, self._stop)  # the port forwarded by the router
        self._relay: Endpoint | None = None
        self.thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="p2prc-reach", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop relaying and remove the port mapping (the server stops)."""
        self._stop.set()
        if self._lock_fd is None:
            return
        self.router.unmap()
        self.state.update(upnp=None, relay=None)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _run(self) -> None:
        lock = self.home / "reach.lock"
        while not self._stop.is_set():
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._stop.wait(5.0)  # another worker does it
                continue
            self._lock_fd = fd
            try:
                self._serve()
            except Exception:  # a bad peer or a full disk must not end it for good
                log.exception("reach agent failed; starting again")
                self._stop.wait(RETRY_SECONDS)
            if self._lock_fd is not None and self._stop.is_set():
                return
            with contextlib.suppress(OSError):
                os.close(fd)
            self._lock_fd = None

    def _serve(self) -> None:
        self.state.update(upnp=None, relay=None, reachable=None)
        if not self._wait_for_server():
            return
        if self.settings.upnp:  # beside the rest: finding no gateway takes seconds
            threading.Thread(target=self.router.map, name="p2prc-router-port", daemon=True,
                             args=(self.settings.port,
                                   f"p2prc {self.identity.node_id[:8]}")).start()
        # "auto" needs the answer first; otherwise the relay comes first (time to reachable).
        next_check = 0.0 if self.settings.use_relay == "auto" else time.monotonic() + 2.0
        failures = 0
        tried: list[str] = []  # relays (``_key``) that failed, skipped until all have
        ladder: list[Endpoint] = []  # the relay in use: its addresses, in dial order
        while not self._stop.is_set():
            if time.monotonic() >= next_check:
                # No peer to ask yet (the table fills after the start): ask again soon.
                next_check = time.monotonic() + (CHECK_SECONDS if self._check_reach()
                                                 else 2.0)
            if not self._wants_relay():
                self._use_relay(None)
                self._stop.wait(5.0)
                continue
            if self._relay is None or not ladder:
                ladder = self._pick_relay(tried) or []
                if not ladder:  # none yet: the table may learn of one any moment
                    tried = []
                    self._stop.wait(1.0)
                    continue
            elif ladder[0] != self._relay:  # the address that answered last, first
                ladder = [self._relay] + [e for e in ladder if e != self._relay]
            try:
                with self.peers.client(ladder) as client:
                    client.health()  # dials the relay's ladder: the address that answers
                    self._use_relay(client.endpoint)
                    if self._listen(client.endpoint, next_check):
                        failures = 0
                        continue
                    while not self._stop.is_set() and self._wants_relay() and \
                            time.monotonic() < next_check:  # a relay of an earlier version
                        token = client.relay_wait(WAIT_SECONDS)
                        failures = 0
                        if token is not None:
                            self._take(client.endpoint, token)
            except P2PRCError as err:
                failures += 1
                log.warning("relay %s: %s", self._relay or _key(ladder), err)
                if failures >= FAILURES_BEFORE_MOVING:
                    tried.append(_key(ladder))
                    self._use_relay(None)
                    failures = 0
                self._stop.wait(RETRY_SECONDS)

    # -- the pieces --------------------------------------------------------------------------

    def _local(self) -> tuple[str, int]:
        return own_server(self.settings)

    def _wait_for_server(self) -> bool:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                socket.create_connection(self._local(), timeout=1).close()
                return True
            except OSError:
                self._stop.wait(0.1)
        return False

    def _candidates(self) -> list[list[Endpoint]]:
        """Relays to use, each as its whole dial ladder (the address that answered last
        first): the configured ones, then peers that offer to relay and answered."""
        entries = self.peers.entries()
        own = self.identity.node_id
        found: dict[str, list[Endpoint]] = {}
        for text in self.settings.relays:
            endpoint = parse_endpoint(text)
            entry = entries.get(endpoint.node_id or "")
            ladder = [endpoint] + ([e for e in self._ladder(entry) if e != endpoint]
                                   if entry is not None else [])
            found.setdefault(_key(ladder), ladder)
        for entry in entries.values():
            if entry.record.get("relay") is True and entry.node_id != own and \
                    entry.measured.last_seen:
                ladder = self._ladder(entry)
                if ladder:
                    found.setdefault(_key(ladder), ladder)
        return list(found.values())

    def _ladder(self, entry: Any) -> list[Endpoint]:
        """A relay's direct endpoints, in dial order, the one that answered last first."""
        direct = [e for e in self.peers.endpoints(entry) if not e.relay]
        last = [e for e in direct if e.path == entry.measured.address]
        return last + [e for e in direct if e not in last]

    def _pick_relay(self, tried: list[str]) -> list[Endpoint] | None:
        for ladder in self._candidates():
            if _key(ladder) not in tried:
                return ladder
        return None

    def _use_relay(self, relay: Endpoint | None) -> None:
        if relay == self._relay:
            return
        self._relay = relay
        self.state.update(relay=None if relay is None else f"{relay.node_id}@{relay.address}",
                          relay_since=time.time() if relay else None)
        if relay is not None:
            log.info("reachable through relay %s", relay.path)
            threading.Thread(target=self._announce, args=(relay,), daemon=True).start()

    def _announce(self, relay: Endpoint) -> None:
        """Hand the relay (and so the network) the record that names it."""
        try:
            if relay.node_id not in self.peers.entries():
                self.peers.add(relay)
            else:
                self.peers.update(hops=1, only=[relay.node_id])
        except P2PRCError as err:
            log.warning("could not hand relay %s our record: %s", relay, err)
        if not self.state.read().get("reachable"):
            self._check_reach()  # the loop is in the relay's long poll

    def _wants_relay(self) -> bool:
        mode = self.settings.use_relay
        if mode == "never":
            return False
        if mode == "always":
            return True
        reachable = (self.state.read().get("reachable") or {}).get("reachable")
        return reachable is not True

    def _check_reach(self) -> bool:
        """Ask a peer (the relay, else one that answered lately) to dial us back; False when
        no peer could be asked."""
        askers = ([[self._relay]] if self._relay else []) + self._candidates()
        if not askers:
            askers = [self.peers.endpoints(entry) for entry in self.peers.entries().values()
                      if entry.measured.last_seen and self.peers.endpoints(entry)]
        for asker in askers[:3]:
            try:
                with self.peers.client(asker) as client:
                    answer = client.reach_check(self.settings.advertise_port
                                                or self.settings.port)
            except PeerError as err:
                log.debug("reach check by %s failed: %s", _key(asker), err)
                continue
            self.state.update(reachable={**to_builtins(answer), "by": asker[0].node_id,
                                         "checked": time.time()})
            log.info("dialled back by %s at %s: %s", _key(asker), answer.address,
                     "reachable" if answer.reachable else "NOT reachable")
            return True
        return False

    def _listen(self, relay: Endpoint, until: float) -> bool:
        """Wait for clients on one stream to ``relay`` (``relay_client.open_listen``) until
        the next reach check; False when the relay has no such route (an earlier version:
        then poll it).

        :raises P2PRCError: the relay refused, failed or went silent.
        """
        try:
            tokens = open_listen(relay, self.identity, self.peers.secure,
                                 self.settings.request_timeout)
        except PeerRefused as err:
            if err.status in (404, 405):
                return False
            raise
        with contextlib.closing(tokens):
            while not self._stop.is_set() and self._wants_relay() and \
                    time.monotonic() < until:
                token = tokens.next(1.0)
                if token is not None:
                    self._take(relay, token)
        return True

    def _take(self, relay: Endpoint, token: str) -> None:
        """Accept the client ``token`` names, on a thread of its own (at most
        ``MAX_SETTING_UP`` at once, ``MAX_CARRIED`` joined)."""
        if not self._carried.acquire(blocking=False):
            self._leave_waiting(relay)
            return
        if not self._setting_up.acquire(blocking=False):
            self._carried.release()
            self._leave_waiting(relay)
            return
        threading.Thread(target=self._accept, args=(relay, token), daemon=True).start()

    def _leave_waiting(self, relay: Endpoint) -> None:
        self._left_waiting += 1  # said now and then: a relay could send them unending
        if self._left_waiting in (1, 10, 100) or self._left_waiting % 1000 == 0:
            log.warning("relay %s hands out more clients than this node takes at once "
                        "(%d being set up, %d joined): one left waiting (%d so far)", relay,
                        MAX_SETTING_UP, MAX_CARRIED, self._left_waiting)

    def _accept(self, relay: Endpoint, token: str) -> None:
        """Take the client a relay told us of, and hand it, joined to our own server, to
        the loop that carries relayed clients (which gives its place back when it ends)."""
        joined = False
        try:
            joined = self._carry(relay, token)
        finally:
            self._setting_up.release()
            if not joined:
                self._carried.release()

    def _carry(self, relay: Endpoint, token: str) -> bool:
        try:
            outer = open_accept(relay, token, self.identity, self.peers.secure,
                                self.settings.request_timeout)
        except (P2PRCError, OSError, ssl.SSLError) as err:
            log.warning("relay %s: could not accept a client: %s", relay, err)
            return False
        try:
            local = no_delay(socket.create_connection(self._local(), timeout=5))
        except OSError as err:
            outer.close()
            log.warning("relayed client: our own server does not answer: %s", err)
            return False
        try:
            process_loop("p2prc-relayed-clients").carry(
                outer, no_delay(local), alive=lambda: not self._stop.is_set(),
                finished=lambda done: self._carried.release())
        except BaseException:
            outer.close()
            local.close()
            raise
        return True


def _key(ladder: list[Endpoint]) -> str:
    """One relay, however many addresses it has: its node id, else its first address."""
    return ladder[0].node_id or ladder[0].path


_agents: list[ReachAgent] = []


def start(settings: Settings, home: Path, peers: PeerDirectory) -> ReachAgent:
    agent = ReachAgent(settings, home, peers)
    _agents.append(agent)
    agent.start()
    return agent


def stop_all() -> None:
    """Stop this process's agents (a worker exits)."""
    for agent in _agents:
        agent.stop()
