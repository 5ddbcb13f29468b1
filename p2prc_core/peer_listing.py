"""The peer table as it is listed: a row a peer, best first (``peers ls``, the dashboard's
Peers page, ``Node.peers`` and ``exec``'s choice of peer).

Making the rows asks the plugins to order each peer's addresses and to score it: about
0.1 ms a peer, over a second for a table of 10,000. A long table's rows are therefore kept
in the home (``peers-view.json``, beside ``peers.json``) with a key made of all they are
made of: the table file's and the trust file's bytes (a checksum), the plugins, this node's
own server (its relay hub) and the view's format. A listing whose key matches reads the rows
and makes none; any change to one of those (any write of the table: a refresh, an exchange
a peer started, a pin) makes them again, and keeps them again, whoever lists first; a
running server lists once after each refresh. What changes with the clock alone, the paths
punched lately, is applied at each listing, not kept. The plugins' answers are kept with
the rows: ``p2prc_score_peer`` and ``p2prc_select_address`` must answer from their
arguments alone (docs/writing-plugins.md).

The view is this node's own file, as ``peers.json`` is (0600). It is still checked as it is
read: a row of the wrong shape or type makes the whole view unusable, and the rows are made
again; it never reaches a person or a program unchecked. A view that cannot be written (a
full disk, a read-only home) costs the next listing the time, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2prc_core import __version__
from p2prc_core.models import Endpoint
from p2prc_core.peertable import PeerEntry, PeerTable
from p2prc_core.plugins import PluginHooks
from p2prc_core.trust import TrustStore

VIEW_FILE = "peers-view.json"
VIEW_FORMAT = 1  # raised whenever PeerRow's fields or their meaning change
VIEW_FROM = 1000  # rows from which they are kept: below it, making them takes under 0.1 s


def _whole(value: Any) -> int | None:
    """A count or size a peer's record gives: a whole number from 0, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


@dataclass(frozen=True, slots=True)
class PeerRow:
    """A peer as ``peers ls``, the dashboard and ``import p2prc`` show it: its names, the path
    that answered last, what was measured, and what its record says of GPUs, memory and
    CPUs (its own claim, checked for type only)."""

    name: str
    node_id: str
    own_name: str  # the name the peer gave itself
    address: str
    path: str  # direct, punched (met through a relay, reached direct), relay, or -
    relays: tuple[str, ...]
    latency_ms: float | None
    bandwidth_mbps: float | None
    last_seen: float | None
    failures: int
    gpus: tuple[str, ...]
    gpus_free: int
    memory: int | None  # bytes
    cpus: int | None
    trusted: str | None  # the name it is trusted under; None: not trusted
    score: float
    # Whether it would start a container for this node, as it last said (its answer to a
    # signed exchange, a 201 or a 403); None: not known yet. Its word, checked for type.
    can_host: bool | None = None
    can_host_at: float | None = None  # when it said so

    @property
    def reachable(self) -> bool:
        return self.failures == 0 and self.latency_ms is not None

    @property
    def hosting_rank(self) -> int:
        """0: answered last time and said it would host us; 2: said it would not; 1: the
        rest. The best peer to ask for a container is first by this, then by score."""
        if self.can_host is False:
            return 2
        return 0 if self.can_host and self.reachable else 1

    def as_dict(self) -> dict[str, Any]:
        """The row as ``--json`` prints it (every field is a plain value, or a tuple)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in _ROW_FIELDS}


_ROW_FIELDS = dataclasses.fields(PeerRow)
_NAMES = [f.name for f in _ROW_FIELDS]


def _texts(value: Any) -> bool:
    return type(value) is list and (not value or all(type(v) is str for v in value))


def _number(value: Any, may_be_none: bool = True) -> bool:
    return type(value) in (int, float) or (may_be_none and value is None)


def _count(value: Any) -> bool:
    return value is None or type(value) is int


def _row_from(values: Any) -> PeerRow | None:
    """A kept row (its fields in ``_NAMES``' order) as a PeerRow, or None where it is not
    one: another length, or a field of another type (a bool is not a number here)."""
    if type(values) is not list or len(values) != len(_NAMES):
        return None
    (name, node_id, own_name, address, path, relays, latency, bandwidth, seen, failures, gpus,
     gpus_free, memory, cpus, trusted, score, can_host, can_host_at) = values
    if not (type(name) is type(node_id) is type(own_name) is type(address) is type(path) is str
            and _texts(relays) and _number(latency) and _number(bandwidth) and _number(seen)
            and type(failures) is int and _texts(gpus) and type(gpus_free) is int
            and _count(memory) and _count(cpus) and (trusted is None or type(trusted) is str)
            and _number(score, may_be_none=False)
            and (can_host is None or type(can_host) is bool) and _number(can_host_at)):
        return None
    return PeerRow(name, node_id, own_name, address, path, tuple(relays), latency, bandwidth,
                   seen, failures, tuple(gpus), gpus_free, memory, cpus, trusted, score,
                   can_host, can_host_at)


class PeerListing:
    """The rows of one node's table, kept in its home once the table is long (see the
    module's docstring). ``endpoints(entry, hub)`` is where to dial a peer, in order (the
    first is the address shown); ``hub()`` this node's own server, or None."""

    def __init__(self, table: PeerTable, trust: TrustStore, hooks: PluginHooks,
                 endpoints: Callable[[PeerEntry, Endpoint | None], list[Endpoint]],
                 hub: Callable[[], Endpoint | None], keep_from: int = VIEW_FROM):
        self.table = table
        self.trust = trust
        self.hooks = hooks
        self.endpoints = endpoints
        self.hub = hub
        self.keep_from = keep_from
        self.path = table.path.parent / VIEW_FILE

    def rows(self, with_gpu: bool = False) -> list[PeerRow]:
        """The table, best first: peers that said they would host us before the others
        (``PeerRow.hosting_rank``), each part by ``p2prc_score_peer``. ``with_gpu``: only
        peers with a free GPU."""
        hub = self.hub()
        key = self._key(hub)  # before the rows: a table changed meanwhile is not kept as this
        rows = self._kept(key)
        if rows is None:
            rows = self._made(hub)
            self._keep(key, rows)
        from p2prc_core.punched import punched_lately

        direct = punched_lately(self.table.path.parent)
        return [dataclasses.replace(r, path="punched") if r.path == "relay"
                and r.node_id in direct else r for r in rows if not with_gpu or r.gpus_free > 0]

    def keep(self) -> None:
        """Make and keep the rows now if the table is long and they are not kept (a
        running server does, after each refresh)."""
        self.rows()

    # -- the view in the home ----------------------------------------------------------------

    def _key(self, hub: Endpoint | None) -> str:
        def told(path: Path) -> list[int] | None:
            """The file's size and a checksum of its bytes (about 10 ms for a table of
            10,000): its inode and change time would not tell two versions apart that a
            coarse clock stamps alike, nor the same bytes written again."""
            try:
                data = path.read_bytes()
            except OSError:
                return None
            return [len(data), zlib.crc32(data)]

        parts = [VIEW_FORMAT, __version__, told(self.table.path), told(self.trust.path),
                 self.table.allow_loopback,
                 None if hub is None else [hub.host, hub.port, hub.node_id, hub.relay],
                 [i.as_dict() for i in self.hooks.plugin_info()]]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def _kept(self, key: str) -> list[PeerRow] | None:
        try:
            if not self.path.is_file():  # (a FIFO there would hold the open)
                return None
            with self.path.open("rb") as f:
                view = json.load(f)
        except (OSError, ValueError, RecursionError):  # (nested past the parser's depth)
            return None
        if not isinstance(view, dict) or view.get("key") != key \
                or view.get("fields") != _NAMES or not isinstance(view.get("rows"), list):
            return None
        rows = [_row_from(values) for values in view["rows"]]
        return None if None in rows else rows  # type: ignore[return-value]

    def _keep(self, key: str, rows: list[PeerRow]) -> None:
        if len(rows) < self.keep_from:
            try:
                self.path.unlink()  # a table grown short again keeps no view
            except OSError:
                pass
            return
        from p2prc_core.storage import atomic_write

        view = {"key": key, "fields": _NAMES,
                "rows": [[getattr(r, n) for n in _NAMES] for r in rows]}
        try:
            atomic_write(self.path, json.dumps(view, separators=(",", ":")).encode())
        except OSError:
            pass  # only a cache: the next listing makes the rows again

    # -- making the rows -----------------------------------------------------------------------

    def _made(self, hub: Endpoint | None) -> list[PeerRow]:
        entries = self.table.load() if self.table.path.exists() else {}
        trusted = {k: name or k[:8] for k, name in self.trust.names().items()}
        ranked = self.hooks.ranked(e.to_peer() for e in entries.values())
        rows = [self._row(entries[peer.node_id], peer.free_gpus, trusted.get(peer.node_id),
                          score, hub) for peer, score in ranked]
        return sorted(rows, key=lambda row: row.hosting_rank)  # stable: score within each

    def _row(self, entry: PeerEntry, free_gpus: int, trusted: str | None, score: float,
             hub: Endpoint | None) -> PeerRow:
        measured = entry.measured
        endpoints = [] if measured.address else self.endpoints(entry, hub)
        address = measured.address or (endpoints[0].path if endpoints else "-")
        specs = entry.record.get("specs")
        specs = specs if isinstance(specs, dict) else {}
        gpus = specs.get("gpus")
        return PeerRow(
            name=entry.local_name or entry.name, node_id=entry.node_id, own_name=entry.name,
            address=address,
            path="relay" if address.startswith("relay ") else
            "direct" if measured.address else "-",
            relays=tuple(r.node_id or "" for r in self.table.relays(entry.record)),
            latency_ms=measured.latency_ms, bandwidth_mbps=measured.bandwidth_mbps,
            last_seen=measured.last_seen, failures=measured.failures,
            gpus=tuple(g for g in gpus if isinstance(g, str))[:8]
            if isinstance(gpus, list) else (),
            gpus_free=free_gpus, memory=_whole(specs.get("memory")),
            cpus=_whole(specs.get("cpus")), trusted=trusted, score=round(score, 3),
            can_host=measured.hosts_us, can_host_at=measured.hosts_us_at)
