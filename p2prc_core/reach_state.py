"""``$P2PRC_HOME/reach.json``: what the running server learnt of how others reach this node
(written by ``reach.ReachAgent``; read by the record and ``p2prc status``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2prc_core.storage import read_json_object, update_json

STATE_FILE = "reach.json"


class ReachState:
    """``reach.json``: {"upnp": {...} | null, "relay": "ID@ADDR" | null, "relay_since",
    "reachable": {"reachable", "address", "by", "checked", "error"} | null}."""

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
