"""The peer table as it is listed: a row a peer, best first (``peers ls``, the dashboard's
Peers page, ``Node.peers`` and ``exec``'s choice of peer).

Making the rows asks the plugins to order each peer's addresses and to score it: about
0.1 ms a peer, over a second for a table of 10,000. A long table's rows are therefore kept
in the home (``peers-view.json``, beside ``peers.json``), with what they were made from:
the table file (its size and a checksum of its bytes), and the context, which is the
plugins, this node's own server (its relay hub) and the view's format. A listing of the
same table in the same context reads the rows and makes none. After a change of the table
(a refresh, an exchange a peer started, a name), only the rows of the peers whose entries
changed are made again (each entry has a mark: its record's signature, its local name, what
was measured of it), and the rest taken; in another context, every row is made again.
Whoever lists first keeps the result; a running server lists once after each refresh. What
the table does not hold, the trust list's names and the paths punched lately, is applied at
each listing, never kept. The plugins' answers are kept with the rows: ``p2prc_score_peer``
and ``p2prc_select_address`` must answer from their arguments alone
(docs/writing-plugins.md).

The view is this node's own file, as ``peers.json`` is (0600). It is still checked as it is
read: a row of the wrong shape or type makes the whole view unusable, and the rows are made
again; it never reaches a person or a program unchecked. A view that cannot be written (a
full disk, a read-only home) costs the next listing the time, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
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
VIEW_FORMAT = 4  # raised whenever PeerRow's fields or their meaning change (4: mapped)
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
    path: str  # direct, mapped (at its router's port mapping), punched (met through a relay,
    # reached direct), relay, or -
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
        """The row as ``--json`` prints it (every field is a plain value, or a list)."""
        found = {name: getattr(self, name) for name in _NAMES}
        found["relays"], found["gpus"] = list(self.relays), list(self.gpus)
        return found


_NAMES = [f.name for f in dataclasses.fields(PeerRow)]


_NONE = type(None)
# The types each field of a kept row may have, in ``_NAMES``' order ("texts": a list of
# strings, made a tuple): those a row is made with (measures and scores are floats). A bool
# is not a number here, and no number is NaN or infinite (``_view`` refuses them).
_TYPES: list[Any] = [{str}, {str}, {str}, {str}, {str}, "texts", {float, _NONE},
                     {float, _NONE}, {float, _NONE}, {int}, "texts", {int},
                     {int, _NONE}, {int, _NONE}, {str, _NONE}, {float}, {bool, _NONE},
                     {float, _NONE}]


def _rows_from(values: Any) -> list[PeerRow] | None:
    """Kept rows (each a list of its fields in ``_NAMES``' order) as PeerRows, or None
    where any is not one: another length, or a field of another type. Checked a column at
    a time (10,000 rows in a few milliseconds)."""
    if type(values) is not list or not all(type(v) is list and len(v) == len(_NAMES)
                                           for v in values):
        return None
    if not values:
        return []
    columns: list[Any] = list(zip(*values, strict=True))
    for index, allowed in enumerate(_TYPES):
        column = columns[index]
        if allowed == "texts":
            if set(map(type, column)) != {list} or \
                    not all(type(t) is str for texts in column for t in texts):
                return None
            columns[index] = map(tuple, column)
        elif not set(map(type, column)) <= allowed:
            return None
    return list(map(PeerRow, *columns))


def _not_finite(word: str) -> Any:
    raise ValueError(f"{word} is no number a row holds")


def _told(path: Path) -> list[int] | None:
    """A file's size and two checksums of its bytes, 64 bits in all (about 10 ms for a
    table of 10,000): its inode and change time would not tell two versions apart that a
    coarse clock stamps alike."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return [len(data), zlib.crc32(data), zlib.adler32(data)]


def _at_mapping(address: str, record: dict[str, Any]) -> bool:
    """Whether ``address`` (HOST:PORT, what answered) is at the address the peer's record
    says its router maps for it (``metadata.mapped``: a peer's word, only ever shown; one
    that is not an IP address is as if absent)."""
    metadata = record.get("metadata")
    mapped = metadata.get("mapped") if isinstance(metadata, dict) else None
    if not isinstance(mapped, str) or len(mapped) > 45:
        return False
    try:
        wanted = ipaddress.ip_address(mapped)
        host = address.rpartition(":")[0].strip("[]")
        return ipaddress.ip_address(host) == wanted
    except ValueError:
        return False


def _mark(entry: PeerEntry) -> str:
    """What a peer's row is made of, of its entry, in 128 bits: its signed record (by its
    signature), its local name, and what was measured of it that a row shows. (A 32-bit
    checksum here would take a changed entry for the same one about once in 4 billion
    changes, and a server changes thousands an hour.)"""
    m = entry.measured
    return hashlib.blake2b(repr((entry.record.get("signature"), entry.local_name,
                                 m.latency_ms, m.bandwidth_mbps, m.last_seen, m.failures,
                                 m.address, m.hosts_us, m.hosts_us_at)).encode(),
                           digest_size=16).hexdigest()


@dataclass
class _View:
    """What ``peers-view.json`` holds: the rows, best first, with the context and the table
    they were made from, and each row's entry mark and score (unrounded, as ranked)."""

    context: str
    table: list[int] | None
    rows: list[PeerRow]
    marks: list[str]
    scores: list[float]

    def as_json(self) -> dict[str, Any]:
        return {"context": self.context, "table": self.table, "fields": _NAMES,
                "rows": [[getattr(r, n) for n in _NAMES] for r in self.rows],
                "marks": self.marks, "scores": self.scores}

    @classmethod
    def from_json(cls, data: Any) -> _View | None:
        """The view, or None where any part of it is not what ``as_json`` writes."""
        if not isinstance(data, dict) or data.get("fields") != _NAMES:
            return None
        context, table = data.get("context"), data.get("table")
        values, marks, scores = data.get("rows"), data.get("marks"), data.get("scores")
        if not (isinstance(context, str) and isinstance(values, list)
                and isinstance(marks, list) and isinstance(scores, list)
                and len(values) == len(marks) == len(scores)
                and (table is None or (type(table) is list and len(table) == 3
                                       and all(type(t) is int for t in table)))
                and all(type(m) is str for m in marks)
                and all(type(v) is float for v in scores)):
            return None
        rows = _rows_from(values)
        return None if rows is None else cls(context, table, rows, marks, scores)


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
        context = self._context(hub)
        table = _told(self.table.path)  # before the rows: a table changed meanwhile is not
        view = self._view()              # kept as this one
        if view is not None and view.context == context and view.table == table:
            rows = view.rows
        else:
            rows, marks, scores = self._made(hub, view if view and view.context == context
                                             else None)
            self._keep(_View(context, table, rows, marks, scores))
        from p2prc_core.punched import punched_lately

        direct = punched_lately(self.table.path.parent)
        trusted = {k: name or k[:8] for k, name in self.trust.names().items()}
        shown = []
        for row in rows:
            if with_gpu and row.gpus_free <= 0:
                continue
            path = "punched" if row.path == "relay" and row.node_id in direct else row.path
            name = trusted.get(row.node_id)
            if path != row.path or name != row.trusted:
                row = dataclasses.replace(row, path=path, trusted=name)
            shown.append(row)
        return shown

    def keep(self) -> None:
        """Make and keep the rows now if the table is long and they are not kept (a
        running server does, after each refresh)."""
        self.rows()

    # -- the view in the home ----------------------------------------------------------------

    def _context(self, hub: Endpoint | None) -> str:
        """What the rows are made with besides the table: where the plugins' answers and
        the dial ladder may differ, no row of the view is taken."""
        parts = [VIEW_FORMAT, __version__, self.table.allow_loopback,
                 None if hub is None else [hub.host, hub.port, hub.node_id, hub.relay],
                 [i.as_dict() for i in self.hooks.plugin_info()]]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def _view(self) -> _View | None:
        try:
            if not self.path.is_file():  # (a FIFO there would hold the open)
                return None
            with self.path.open("rb") as f:
                data = json.load(f, parse_constant=_not_finite)
        except (OSError, ValueError, RecursionError):  # (nested past the parser's depth)
            return None
        return _View.from_json(data)

    def _keep(self, view: _View) -> None:
        if len(view.rows) < self.keep_from:
            try:
                self.path.unlink()  # a table grown short again keeps no view
            except OSError:
                pass
            return
        from p2prc_core.storage import atomic_write

        try:
            atomic_write(self.path, json.dumps(view.as_json(), separators=(",", ":")).encode())
        except OSError:
            pass  # only a cache: the next listing makes the rows again

    # -- making the rows -----------------------------------------------------------------------

    def _made(self, hub: Endpoint | None, before: _View | None
              ) -> tuple[list[PeerRow], list[str], list[float]]:
        """The rows, their entries' marks and their scores; a row of ``before`` (made in
        the same context) whose entry's mark is the same is taken, not made again."""
        entries = self.table.load() if self.table.path.exists() else {}
        trusted = {k: name or k[:8] for k, name in self.trust.names().items()}
        had = {} if before is None else \
            {row.node_id: (mark, row, score)
             for row, mark, score in zip(before.rows, before.marks, before.scores, strict=True)}
        made: list[tuple[float, int, PeerRow, str]] = []
        for index, entry in enumerate(entries.values()):
            mark = _mark(entry)
            kept = had.get(entry.node_id)
            if kept is not None and kept[0] == mark:
                made.append((kept[2], index, kept[1], mark))
                continue
            peer = entry.to_peer()
            score = self.hooks.score_peer(peer)
            made.append((score, index, self._row(entry, peer.free_gpus,
                                                 trusted.get(entry.node_id), score, hub), mark))
        made.sort(key=lambda item: (-item[0], item[1]))  # as PluginHooks.ranked orders them
        made.sort(key=lambda item: item[2].hosting_rank)  # stable: score within each
        return [m[2] for m in made], [m[3] for m in made], [m[0] for m in made]

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
            ("mapped" if _at_mapping(measured.address, entry.record) else "direct")
            if measured.address else "-",
            relays=tuple(r.node_id or "" for r in self.table.relays(entry.record)),
            latency_ms=measured.latency_ms, bandwidth_mbps=measured.bandwidth_mbps,
            last_seen=measured.last_seen, failures=measured.failures,
            gpus=tuple(g for g in gpus if isinstance(g, str))[:8]
            if isinstance(gpus, list) else (),
            gpus_free=free_gpus, memory=_whole(specs.get("memory")),
            cpus=_whole(specs.get("cpus")), trusted=trusted, score=round(score, 3),
            can_host=measured.hosts_us, can_host_at=measured.hosts_us_at)
