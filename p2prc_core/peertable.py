"""The IP table: ``$P2PRC_HOME/peers.json``, signed peer records and what was measured.

One entry per node id (a ``PeerEntry``)::

    {"record": <the node's signed record>,
     "changed": <this table's clock when the record last changed>,
     "measured": {"latency_ms", "bandwidth_mbps", "last_seen", "failures", "address",
                  "cursor", "holds_our_seq", "hosts_us", "hosts_us_at"}}

The table's ``clock`` grows with every record change; together with the table's random
``epoch`` it makes a cursor, so a peer that asks again gets only what changed since.
``pins`` maps an ``ADDRESS:PORT`` to the node id whose key answered there (over TLS): a
later answer there with another key is refused.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from p2prc_core import gossip
from p2prc_core.gossip import Versions
from p2prc_core.models import Address, Endpoint, KnownPeer, parse_endpoint
from p2prc_core.records import MAX_ADDRESSES, MergeResult, merge_records, verified_records
from p2prc_core.storage import read_json_object, update_json

PEERS_FILE = "peers.json"
FORMAT = 1

T = TypeVar("T")


GONE_SECONDS = 3600  # how long a dropped peer's version still counts in the digest


def record_token(record: dict[str, Any]) -> str:
    """The ``gossip.record_token`` of a record's version."""
    return gossip.record_token(record.get("node_id"), record.get("seq"))


def dialable(address_text: str, allow_loopback: bool) -> Address | None:
    """The address, if a table may make us dial it (no loopback unless allowed, no
    link-local, multicast, unspecified, 169.254.169.254, or IPv4-mapped forms of those).
    Text longer than any address is none (and is not kept by the cache below)."""
    if len(address_text) > MAX_ADDRESS_TEXT:
        return None
    return _dialable(address_text, allow_loopback)


MAX_ADDRESS_TEXT = 64  # as records.verify_record allows


@functools.lru_cache(maxsize=1 << 14)  # every record held is checked on every merge
def _dialable(address_text: str, allow_loopback: bool) -> Address | None:
    try:
        address = Address.parse(address_text)  # maps ::ffff:a.b.c.d to a.b.c.d
    except ValueError:
        return None
    return address if address.usable(allow_loopback) else None


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No cyclic garbage collection while a table is read: its tens of thousands of new
    objects would each time start collections that find nothing (a fifth of a 10,000-peer
    read)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)  # one per peer held: thousands in a large table
class Measured:
    """What this node measured of a peer, and where the exchange with it stands."""

    latency_ms: float | None = None
    bandwidth_mbps: float | None = None
    last_seen: float | None = None
    failures: int = 0
    address: str | None = None  # the endpoint that answered last
    cursor: str | None = None  # where our next exchange with it starts
    holds_our_seq: int | None = None  # the seq of our record it holds
    hosts_us: bool | None = None  # whether it would start a container for us (its word)
    hosts_us_at: float | None = None  # when it last said so (an exchange, a 201 or a 403)
    asked_at: float | None = None  # when an update last asked it (answered or not)
    # Taken back after it was lost (``TableState.drop``): its next answer in person lists
    # what it holds of what this node dropped (``discovery.Discovery.contact``).
    rejoined: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what another version wrote

    @classmethod
    def from_json(cls, data: Any) -> Measured:
        """Read leniently: a field of the wrong type is as if absent; fields this version
        does not know are kept as they are."""
        if not isinstance(data, dict):
            return cls()
        get = data.get  # (read for every peer of the table: kept to plain calls)
        address, cursor, hosts_us = get("address"), get("cursor"), get("hosts_us")
        return cls(_number(get("latency_ms")), _number(get("bandwidth_mbps")),
                   _number(get("last_seen")), _whole(get("failures")) or 0,
                   address if isinstance(address, str) else None,
                   cursor if isinstance(cursor, str) else None,
                   _whole(get("holds_our_seq")),
                   hosts_us if isinstance(hosts_us, bool) else None,
                   _number(get("hosts_us_at")), _number(get("asked_at")),
                   True if get("rejoined") is True else None,
                   {} if _MEASURED_FIELDS.issuperset(data) else
                   {k: v for k, v in data.items() if k not in _MEASURED_FIELDS})

    def to_json(self) -> dict[str, Any]:
        known = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name != "extra" and getattr(self, f.name) is not None}
        return {**self.extra, **known}


_MEASURED_FIELDS = frozenset(f.name for f in fields(Measured))  # (read for every entry)


_ENTRY_FIELDS = frozenset({"record", "changed", "measured", "local_name"})


@dataclass(slots=True)
class PeerEntry:
    """One peer in the table: its signed record and what was measured of it."""

    record: dict[str, Any]
    changed: int = 0
    measured: Measured = field(default_factory=Measured)
    local_name: str | None = None  # the user's own name for it (wins over the record's)
    extra: dict[str, Any] = field(default_factory=dict)  # what another version wrote

    @property
    def node_id(self) -> str:
        return str(self.record["node_id"])

    @property
    def name(self) -> str:
        return str(self.record.get("name", ""))

    @property
    def port(self) -> int:
        return int(self.record.get("port", 0))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerEntry:
        changed = _whole(data.get("changed")) or 0
        local = data.get("local_name")
        extra = {} if _ENTRY_FIELDS.issuperset(data) else \
            {k: v for k, v in data.items() if k not in _ENTRY_FIELDS}
        return cls(data["record"], changed, Measured.from_json(data.get("measured")),
                   local if isinstance(local, str) else None, extra)

    def to_json(self) -> dict[str, Any]:
        data = {**self.extra, "record": self.record, "changed": self.changed,
                "measured": self.measured.to_json()}
        if self.local_name:
            data["local_name"] = self.local_name
        return data

    def to_peer(self) -> KnownPeer:
        """What scoring plugins see of an entry."""
        record, measured = self.record, self.measured
        return KnownPeer(node_id=self.node_id, name=self.name,
                          addresses=list(record.get("addresses", [])), port=self.port,
                          latency_ms=measured.latency_ms,
                          bandwidth_mbps=measured.bandwidth_mbps,
                          failures=measured.failures, specs=record.get("specs", {}),
                          metadata=record.get("metadata", {}))


@dataclass
class TableState:
    """The whole file, as loaded under the lock."""

    epoch: str
    clock: int
    peers: dict[str, PeerEntry]
    pins: dict[str, str] = field(default_factory=dict)  # ADDRESS:PORT -> node id seen there
    # Our own address as peers saw our requests come from it: address -> {"by", "last"}.
    observed: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Peers dropped lately (pruned as dead, or forgotten): node id -> [seq, when], or
    # [seq, when, 1] for one lost (it had answered, then failed: maybe a cut, not a death).
    # Their versions count in the digest and are not asked for again (``gossip``); a record
    # of theirs that arrives anyway is taken as usual (``taken_back``).
    gone: dict[str, list[float]] = field(default_factory=dict)
    _order: list[tuple[int, str]] | None = field(default=None, repr=False, compare=False)
    _versions: tuple[tuple[str, int], Versions] | None = field(default=None, repr=False,
                                                                compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableState:
        """Whatever the file holds, read leniently: entries without a record are dropped,
        and a table without an epoch gets a new one."""
        found = data.get("peers")
        peers = {k: PeerEntry.from_json(v) for k, v in found.items()
                 if isinstance(v, dict) and isinstance(v.get("record"), dict)} \
            if isinstance(found, dict) else {}
        epoch = data.get("epoch")
        clock = data.get("clock", 0)
        clock = clock if isinstance(clock, int) and not isinstance(clock, bool) else 0
        found_pins = data.get("pins")
        pins = {k: v for k, v in found_pins.items() if isinstance(v, str)} \
            if isinstance(found_pins, dict) else {}
        found_observed = data.get("observed")
        observed = {k: v for k, v in found_observed.items() if isinstance(v, dict)} \
            if isinstance(found_observed, dict) else {}
        found_gone = data.get("gone")
        gone = {k: v for k, v in found_gone.items() if isinstance(v, list)
                and len(v) in (2, 3) and _whole(v[0]) is not None
                and _number(v[1]) is not None} \
            if isinstance(found_gone, dict) else {}
        return cls(epoch if isinstance(epoch, str) else secrets.token_hex(6), clock, peers,
                   pins, observed, gone)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "epoch": self.epoch, "clock": self.clock,
                "peers": {k: e.to_json() for k, e in self.peers.items()}, "pins": self.pins,
                "observed": self.observed, "gone": self.gone}

    def drop(self, node_id: str, now: float | None = None, lost: bool = False) -> bool:
        """Remove a peer, remembering its version as gone for ``GONE_SECONDS`` (how many
        are kept is the table's to say: ``forget_gone``, ``PeerTable.max_gone``). ``lost``:
        it had answered, and failed since."""
        entry = self.peers.pop(node_id, None)
        if entry is None:
            return False
        seq = entry.record.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            when = time.time() if now is None else now
            self.gone[node_id] = [seq, when, 1] if lost else [seq, when]
        self.changed_records()
        return True

    def taken_back(self, node_id: str) -> bool:
        """A gone peer's record is held again: it is gone no more. Whether it had been
        lost (``drop``)."""
        mark = self.gone.pop(node_id, None)
        return mark is not None and len(mark) > 2 and mark[2] == 1

    def turned_away(self, records: list[dict[str, Any]]) -> None:
        """Genuine records the table had no room for count as gone: the digest does not
        fetch them again and again. (Verified first: a forged record must not keep the
        real one out.)"""
        now = time.time()
        for record in records:
            seq = record.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool):
                self.gone[record["node_id"]] = [seq, now]

    def forget_gone(self, keep: int, now: float | None = None) -> None:
        """Forget versions gone for over ``GONE_SECONDS``, and the oldest beyond ``keep``."""
        now = time.time() if now is None else now
        recent = sorted(((mark[1], node_id) for node_id, mark in self.gone.items()
                         if now - mark[1] < GONE_SECONDS), reverse=True)[:keep]
        if len(recent) != len(self.gone):
            self.gone = {node_id: self.gone[node_id] for _, node_id in recent}
            self.changed_records()

    def changed_records(self) -> None:
        """The records held changed: what was computed from them is stale."""
        self._order = None
        self._versions = None

    def versions(self, own: dict[str, Any] | None = None) -> Versions:
        """The versions this node knows (``gossip.Versions``): its peers', its own record's
        (``own``), and those gone lately. Kept while the state is."""
        key = (str(own.get("node_id")), int(own.get("seq", 0))) if own else ("", 0)
        if self._versions is None or self._versions[0] != key:
            held = {n: int(e.record.get("seq", 0)) for n, e in self.peers.items()}
            if own:
                held[key[0]] = key[1]
            self._versions = (key, Versions(held, {n: int(v[0]) for n, v in
                                                   self.gone.items()}))
        return self._versions[1]

    def observe(self, address: str, by: str, now: float) -> None:
        """A peer saw our request come from ``address``: kept for the 8 most recent
        addresses, with the last time and the last few peers that said so."""
        seen = self.observed.setdefault(address, {"by": [], "last": now})
        seen["last"] = now
        seen["by"] = ([b for b in seen.get("by", []) if b != by] + [by])[-4:]
        if len(self.observed) > 8:
            oldest = min(self.observed, key=lambda a: self.observed[a].get("last", 0))
            del self.observed[oldest]

    def cursor(self) -> str:
        return f"{self.epoch}:{self.clock}"

    def changes_since(self, cursor: str | None, limit: int,
                      have: frozenset[str] = frozenset()) -> tuple[list[dict[str, Any]],
                                                                   str, bool]:
        """Records changed after ``cursor`` (all, for another epoch or none), oldest change
        first, at most ``limit``, leaving out those whose ``record_token`` is in ``have``
        (the asker holds them already); returns them, the cursor to ask with next, and
        whether more are waiting."""
        since = 0
        if cursor:
            epoch, _, clock = cursor.partition(":")
            if epoch == self.epoch and clock.isascii() and clock.isdigit():
                since = int(clock)
        if self._order is None:  # kept while the state is (a cached snapshot is not changed)
            self._order = sorted((e.changed, node_id) for node_id, e in self.peers.items())
        start = bisect.bisect_right(self._order, (since, "\uffff"))
        changed = self._order[start:]
        records: list[dict[str, Any]] = []
        last, more = since, False
        for stamp, node_id in changed:
            if len(records) == limit:
                more = True
                break
            last = stamp
            record = self.peers[node_id].record
            if have and record_token(record) in have:
                continue
            records.append(record)
        return records, f"{self.epoch}:{last if more else self.clock}", more


class PeerTable:
    """Load, merge and save the table; every change is locked and written atomically."""

    def __init__(self, home: Path, self_id: str | None = None, allow_loopback: bool = False,
                 max_peers: int = 5000, max_unverified: int | None = None):
        self.path = home / PEERS_FILE
        self.self_id = self_id
        self.allow_loopback = allow_loopback
        self.max_peers = max_peers
        self.max_unverified = max_unverified if max_unverified is not None else max_peers
        self._cached: tuple[tuple[int, int, int], TableState] | None = None

    @property
    def max_gone(self) -> int:
        """How many dropped peers' versions ``gone`` keeps: twice the table, so that a full
        table in a network larger than itself does not fetch the rest again and again."""
        return 2 * self.max_peers

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> TableState:
        """The table as it is on disk, parsed once per change of the file: a server answers
        many reads of a large table from one parse. Treat it as read-only."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return TableState.from_json({})
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = self._cached
        # A file changed in the last two seconds is read again: two writes inside one clock
        # tick can leave mtime, size and (a reused) inode all the same.
        settled = time.time() - stat.st_mtime > 2.0
        if settled and cached is not None and cached[0] == key:
            return cached[1]
        with _no_collection():
            state = TableState.from_json(read_json_object(self.path))
        self._cached = (key, state) if settled else None
        return state

    def load(self) -> dict[str, PeerEntry]:
        """node id -> entry."""
        return self.snapshot().peers

    # -- changing --------------------------------------------------------------------------

    def update(self, change: Callable[[TableState], T]) -> T:
        """Run ``change`` on the table under the lock; save it (atomically) if it changed."""
        def apply(data: dict[str, Any]) -> T:
            state = TableState.from_json(data)
            result = change(state)
            data.clear()
            data.update(state.to_json())
            return result

        return update_json(self.path, apply)

    def ensure(self) -> None:
        """Create the file if missing, so that the table's epoch (and cursors) stay put."""
        self.update(lambda state: None)

    def merge(self, incoming: list[Any], verified: bool = False) -> MergeResult:
        """Verify and merge signed records (see ``records.merge_records``); a record with no
        address this node may dial is dropped as ``no-address``. ``verified``: the caller
        checked each with ``verify_record`` already (it is not checked twice)."""
        return self.update(lambda state: self.merge_into(state, incoming, verified=verified))

    def merge_into(self, state: TableState, incoming: list[Any],
                   check_addresses: bool = True,
                   admit: Callable[[int], int] | None = None,
                   verified: bool = False) -> MergeResult:
        """Verify (unless ``verified``) and merge records (see ``merge_records``). Records
        of peers the table does not hold yet are newcomers: ``admit(n)`` says how many of
        ``n`` one source may add (the rest are dropped as ``rate-limited``); newcomers go
        to the part of the table for peers that never answered, which holds at most
        ``max_unverified`` and gives way, oldest first, to newer ones; peers that answered
        are never pushed out."""
        usable = []
        dropped_no_address = malformed = 0
        for record in incoming:
            if not isinstance(record, dict) or not isinstance(record.get("node_id"), str):
                malformed += 1  # counted here: nothing below may trip over its shape
                continue
            addresses = record.get("addresses")
            if check_addresses and isinstance(addresses, list) and not any(
                    isinstance(a, str) and dialable(a, self.allow_loopback)
                    for a in addresses[:MAX_ADDRESSES]):  # more: refused when verified
                dropped_no_address += 1
                continue
            usable.append(record)
        fresh = list(dict.fromkeys(r["node_id"] for r in usable if r["node_id"] not in
                                   state.peers and r["node_id"] != self.self_id))
        limited = full = 0
        allowed: set[str] = set()
        if fresh:
            granted = admit(len(fresh)) if admit is not None else len(fresh)
            limited = len(fresh) - granted
            allowed = set(fresh[:granted])
            over = set(fresh[granted:])  # over the source's allowance: not even verified
            usable = [r for r in usable if r["node_id"] not in over]
        # Each record verified once, here (those held already need no crypto).
        usable, forged = (usable, Counter[str]()) if verified else verified_records(
            usable, {node_id: entry.record for node_id, entry in state.peers.items()})
        if allowed:
            # Only records that verify may push out others (a copied signature must not).
            genuine = list(dict.fromkeys(r["node_id"] for r in usable
                                         if r["node_id"] in allowed))
            room = self._make_room(state, len(genuine))
            full = len(genuine) - room
            no_room = set(genuine[room:])
            state.turned_away([r for r in usable if r["node_id"] in no_room])
            usable = [r for r in usable if r["node_id"] not in no_room]
        held = {node_id: entry.record for node_id, entry in state.peers.items()}
        result = merge_records(held, usable, self.self_id, verified=True)
        result.dropped.update(forged)
        if malformed:
            result.dropped["malformed"] += malformed
        if limited:
            result.dropped["rate-limited"] += limited
        if full:
            result.dropped["table-full"] += full
        if dropped_no_address:
            result.dropped["no-address"] += dropped_no_address
        for node_id in result.added + result.updated:
            state.clock += 1
            entry = state.peers.setdefault(node_id, PeerEntry(held[node_id]))
            entry.record = held[node_id]
            entry.changed = state.clock
            if state.taken_back(node_id):
                entry.measured.rejoined = True
        if result.added or result.updated or full:
            state.changed_records()
        if len(state.gone) > self.max_gone:
            state.forget_gone(self.max_gone)
        return result

    def _make_room(self, state: TableState, wanted: int) -> int:
        """Room for up to ``wanted`` newcomers: free places first, then places of peers that
        never answered (oldest first). Returns how many newcomers fit."""
        unverified = sorted((e.changed, node_id) for node_id, e in state.peers.items()
                            if e.measured.last_seen is None)
        free = min(self.max_peers - len(state.peers), self.max_unverified - len(unverified))
        evict = max(0, min(wanted - max(free, 0), len(unverified)))
        for _, node_id in unverified[:evict]:
            state.drop(node_id)  # gone: not fetched again at once for lack of room
        return max(0, min(wanted, max(free, 0) + evict))

    def pin(self, addresses: list[str], node_id: str) -> None:
        """Remember that ``node_id`` answered at ``addresses`` (the spellings of one
        endpoint: trust on first use, or the user's NODE_ID@ADDRESS), in one write."""
        def change(state: TableState) -> None:
            for address in addresses:
                state.pins[address] = node_id

        self.update(change)

    def forget(self, node_id: str) -> bool:
        """Drop a peer and every address pinned to it; False if there was nothing to drop."""
        def change(state: TableState) -> bool:
            pinned = [a for a, n in state.pins.items() if n == node_id]  # every spelling
            for address in pinned:
                del state.pins[address]
            return state.drop(node_id) or bool(pinned)

        return self.update(change)

    def name(self, node_id: str, local_name: str) -> None:
        """Give a peer the user's own name for it; no other peer keeps that name."""
        def change(state: TableState) -> None:
            for entry in state.peers.values():
                if entry.local_name == local_name:
                    entry.local_name = None
            if node_id in state.peers:
                state.peers[node_id].local_name = local_name

        self.update(change)

    def remember_hosting(self, node_id: str, hosts_us: bool, now: float | None = None) -> bool:
        """Remember whether a peer would start a container for us (a 201 or a 403 to our
        request); False if the table does not hold it."""
        def remember(state: TableState) -> bool:
            entry = state.peers.get(node_id)
            if entry is not None:
                entry.measured.hosts_us = hosts_us
                entry.measured.hosts_us_at = time.time() if now is None else now
            return entry is not None

        return self.update(remember)

    def record_bandwidth(self, node_id: str, mbit_per_second: float) -> bool:
        """Remember a speed test's result for a peer; False if the table does not hold it."""
        def remember(state: TableState) -> bool:
            entry = state.peers.get(node_id)
            if entry is not None:
                entry.measured.bandwidth_mbps = round(mbit_per_second, 1)
            return entry is not None

        return self.update(remember)

    def relays(self, record: dict[str, Any]) -> list[Endpoint]:
        """The relays a (verified) record names, at addresses this node may dial."""
        found = []
        for text in record.get("relays", []):
            try:
                endpoint = parse_endpoint(text)
            except ValueError:
                continue
            if dialable(endpoint.host, self.allow_loopback) is not None:
                found.append(endpoint)
        return found

    def dial_addresses(self, record: dict[str, Any]) -> list[Address]:
        found = []
        for text in record.get("addresses", []):
            address = dialable(text, self.allow_loopback) if isinstance(text, str) else None
            if address is not None and address not in found:
                found.append(address)
        return found
