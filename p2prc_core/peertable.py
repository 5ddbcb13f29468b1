"""The IP table: ``$P2PRC_HOME/peers.json``, signed peer records and what was measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2prc_core.records import MergeResult, merge_records
from p2prc_core.storage import atomic_write_json, locked, read_json_file

PEERS_FILE = "peers.json"
FORMAT = 1


class PeerTable:
    """Load, merge and save the table; every change is locked and written atomically."""

    def __init__(self, home: Path, self_id: str | None = None):
        self.path = home / PEERS_FILE
        self.self_id = self_id

    def load(self) -> dict[str, dict[str, Any]]:
        """node id -> entry (``record`` and ``measured``)."""
        data = read_json_file(self.path, {"format": FORMAT, "peers": {}})
        peers = data.get("peers") if isinstance(data, dict) else None
        return peers if isinstance(peers, dict) else {}

    def records(self) -> list[dict[str, Any]]:
        return [entry["record"] for entry in self.load().values()]

    def merge(self, incoming: list[Any]) -> MergeResult:
        """Verify and merge signed records; see ``records.merge_records`` for what is dropped."""
        with locked(self.path):
            peers = self.load()
            held = {node_id: entry["record"] for node_id, entry in peers.items()}
            result = merge_records(held, incoming, self.self_id)
            for node_id in result.added + result.updated:
                entry = peers.setdefault(node_id, {"measured": {}})
                entry["record"] = held[node_id]
            if result.added or result.updated:
                self._save(peers)
            return result

    def _save(self, peers: dict[str, dict[str, Any]]) -> None:
        atomic_write_json(self.path, {"format": FORMAT, "peers": peers})
