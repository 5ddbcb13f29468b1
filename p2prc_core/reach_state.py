"""``$P2PRC_HOME/reach.json``: what the running server learnt of how others reach this node
(written by ``reach.ReachAgent``; read by the record and ``p2prc status``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from p2prc_core.models import Address
from p2prc_core.storage import read_json_object, update_json

STATE_FILE = "reach.json"


REACHED_MAX = 16  # addresses of ours that peers reached, kept at once
REACHED_SECONDS = 7 * 86400.0  # how long one counts after the last peer reached it there
REACHED_RENEW = 3600.0  # an address noted this recently is not written again


class ReachState:
    """``reach.json``: {"upnp": {...} | null, "relay": "ID@ADDR" | null, "relay_since",
    "reachable": {"reachable", "address", "by", "checked", "error"} | null,
    "reached": {ADDRESS: when a peer last reached this node's server there}}."""

    def __init__(self, home: Path):
        self.path = home / STATE_FILE

    def read(self) -> dict[str, Any]:
        try:
            return read_json_object(self.path)
        except (OSError, ValueError):
            return {}

    def stamp(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0

    def update(self, **changes: Any) -> None:
        def change(state: dict[str, Any]) -> None:
            state.update(changes)

        update_json(self.path, change)

    def reached(self, now: float | None = None) -> dict[str, float]:
        """This machine's addresses at which a peer reached this node's server lately (an
        exchange's connection, by its local address), with when it last did."""
        return recently_reached(self.read(), now)

    def note_reached(self, addresses: Iterable[str], now: float) -> None:
        """Keep ``addresses`` as reached at ``now`` (the latest ``REACHED_MAX``)."""
        def change(state: dict[str, Any]) -> None:
            kept = self.reached(now) | dict.fromkeys(addresses, now)
            state["reached"] = dict(sorted(kept.items(), key=lambda item: -item[1])
                                    [:REACHED_MAX])

        update_json(self.path, change)


def recently_reached(state: dict[str, Any], now: float | None = None) -> dict[str, float]:
    """``reach.json``'s ``reached``, less what is older than ``REACHED_SECONDS``."""
    now = time.time() if now is None else now
    found = state.get("reached")
    if not isinstance(found, dict):
        return {}
    return {a: float(t) for a, t in found.items() if isinstance(a, str)
            and isinstance(t, int | float) and 0 <= now - t < REACHED_SECONDS}


class ReachedAt:
    """Notes where peers reach this node's server (``ReachState.reached``), writing
    ``reach.json`` only for an address new, or not noted within ``REACHED_RENEW``: an
    exchange costs no write in the common case."""

    def __init__(self, home: Path):
        self.state = ReachState(home)
        self._noted: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, address: str | None) -> None:
        """A peer reached us at ``address`` (the connection's local address). Loopback
        (relayed clients arrive through it), link-local and anything not an IP address are
        not kept."""
        try:
            parsed = Address.parse(address or "")
        except ValueError:
            return
        if parsed.kind in ("loopback", "link-local", "unspecified", "multicast"):
            return
        now = time.time()
        text = str(parsed)
        with self._lock:
            if now - self._noted.get(text, float("-inf")) < REACHED_RENEW:
                return
            if not self._noted:  # first in this process: what other workers noted
                self._noted.update(self.state.reached(now))
                if now - self._noted.get(text, float("-inf")) < REACHED_RENEW:
                    return
            self._noted[text] = now
        self.state.note_reached([text], now)
