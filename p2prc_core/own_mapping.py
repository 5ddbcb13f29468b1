"""Where this node's UDP at its p2prc port comes out of its NAT, as its relay sees it.

The worker that owns the UDP socket (``udp_endpoint``) probes its relay from that very socket
every ``MAPPING_SECONDS`` (``udp_probe``'s signed probe): the answer is the mapping a friend's
punch must aim at (``POST /v1/punch`` offers it first), whatever port the router chose; and
the probes keep that mapping open on a router that forgets idle UDP in 30 s or more. It is
kept in ``reach.json`` as ``udp_port``, written when it changes; ``{"blocked": true}`` when
the relay answered none of a round's probes (a punch offer is then refused at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2prc_core.identity import NodeIdentity, node_id_for
from p2prc_core.models import parse_endpoint
from p2prc_core.reach_state import ReachState
from p2prc_core.udp_probe import Answer, Probe, ProbeError

MAPPING_SECONDS = 20.0  # between two probes of the relay, once one was answered
RETRY_SECONDS = 0.5  # between two tries while there is no relay, or no answer
TRIES = 3  # probes in one round, a second apart, before the round gives up


class OwnMapping:
    """Probes this node's relay from the UDP socket (``send``), and takes its answers
    (``answered``, from the socket's reader)."""

    def __init__(self, home: Path, identity: NodeIdentity,
                 send: Callable[[bytes, str, int], None]):
        self.state = ReachState(home)
        self.identity = identity
        self.send = send
        self._waiting: tuple[str, bytes, tuple[str, int]] | None = None
        self._answer = asyncio.Event()
        self._wake = asyncio.Event()
        self.known = False  # an answer came since the start

    def now(self) -> None:
        """Probe at once (an offer came, and no mapping is known yet)."""
        self._wake.set()

    def answered(self, data: bytes, source: tuple[str, int]) -> None:
        """An answer to a probe arrived from ``source``: kept if it is the one awaited (from
        where the probe went, its nonce, signed by the relay)."""
        waiting = self._waiting
        if waiting is None or source != waiting[2]:
            return
        try:
            answer = Answer.read(data)
        except ProbeError:
            return
        if answer.nonce != waiting[1] or node_id_for(answer.key) != waiting[0]:
            return
        self._waiting = None
        self.known = True
        found = {"address": answer.address, "port": answer.port, "by": waiting[0]}
        known = self.state.read().get("udp_port")
        if not isinstance(known, dict) or \
                {k: known.get(k) for k in found} != found:  # written when it changes
            self.state.update(udp_port={**found, "checked": time.time()})
        self._answer.set()

    def relay(self) -> tuple[str, str, int] | None:
        """The relay in use (``reach.json``): its node id, host and port; None for none."""
        text = self.state.read().get("relay")
        if not isinstance(text, str):
            return None
        try:
            endpoint = parse_endpoint(text)
        except ValueError:
            return None
        if endpoint.node_id is None:
            return None
        return endpoint.node_id, endpoint.host, endpoint.port

    async def run(self) -> None:
        """Probe the relay, for ever (the owner's loop runs it as a task)."""
        while True:
            answered = await self._round()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       MAPPING_SECONDS if answered else RETRY_SECONDS)

    async def _round(self) -> bool:
        relay = self.relay()
        if relay is None:
            return False
        node_id, host, port = relay
        for _ in range(TRIES):
            nonce = os.urandom(16)
            probe = Probe(node_id, self.identity.public_key, int(time.time()),
                          nonce).signed(self.identity)
            self._answer.clear()
            self._waiting = (node_id, nonce, (host, port))
            self.send(probe, host, port)
            try:
                await asyncio.wait_for(self._answer.wait(), 1.0)
                return True
            except TimeoutError:
                continue
        self._waiting = None
        known = self.state.read().get("udp_port")
        if not (isinstance(known, dict) and known.get("blocked") is True and
                known.get("by") == node_id):  # written when it changes
            self.state.update(udp_port={"blocked": True, "by": node_id,
                                        "checked": time.time()})
        return False


def blocked(state: dict[str, Any]) -> bool:
    """Whether ``reach.json``'s ``state`` says this node's UDP did not reach its relay, the
    last time it was asked (a firewall, or a router that drops UDP)."""
    found = state.get("udp_port")
    return isinstance(found, dict) and found.get("blocked") is True


def mapping_of(state: dict[str, Any]) -> tuple[str, int] | None:
    """``udp_port`` of ``reach.json``'s ``state``, where it has that shape."""
    found = state.get("udp_port")
    if isinstance(found, dict) and isinstance(found.get("address"), str) and \
            isinstance(found.get("port"), int) and 0 < found["port"] < 65536:
        return found["address"], found["port"]
    return None
