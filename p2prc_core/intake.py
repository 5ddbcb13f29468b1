"""How many new peers one source may add to this node's table through exchanges.

``POST /v1/peers`` is open, and keys are free: one client made 1,617 junk records a second.
Each source (an IPv4 /24 or an IPv6 /48: a home or a provider's customer) may add at most
``exchange_newcomers_per_minute`` peers the table did not hold; updates of known peers are
not counted. The count lives in ``server.db``, shared by every worker.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from p2prc_core.storage import SERVER_DB, SharedDB


def source_prefix(remote: str | None, ipv6_bits: int = 48, ipv4_bits: int = 24) -> str:
    """The prefix a client address counts under: its /24 (IPv4) or /48 (IPv6); other sizes
    with ``ipv4_bits`` and ``ipv6_bits``."""
    try:
        ip = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_bits if ip.version == 4 else ipv6_bits  # a customer often holds a /48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class IntakeLimit:
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS intake (source TEXT NOT NULL, minute INTEGER NOT NULL,
            count INTEGER NOT NULL, PRIMARY KEY (source, minute));
    """

    def __init__(self, home: Path, per_minute: int):
        self.shared = SharedDB(home / SERVER_DB, self.SCHEMA)
        self.per_minute = per_minute

    def admit(self, source: str, wanted: int, now: float | None = None) -> int:
        """How many of ``wanted`` newcomers ``source`` may add now; counts them as added."""
        minute = int((now if now is not None else time.time()) // 60)
        with self.shared.transaction() as db:
            row = db.execute("SELECT count FROM intake WHERE source=? AND minute=?",
                             (source, minute)).fetchone()
            used = row[0] if row else 0
            granted = max(0, min(wanted, self.per_minute - used))
            if granted:
                db.execute("INSERT INTO intake VALUES (?, ?, ?) ON CONFLICT(source, minute) "
                           "DO UPDATE SET count = count + ?", (source, minute, granted, granted))
            if minute % 10 == 0:
                db.execute("DELETE FROM intake WHERE minute < ?", (minute - 1,))
            return granted
