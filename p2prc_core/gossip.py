"""What keeps a refresh's cost flat however large the network grows.

Two economies, both on the asking side's choice:

- **A fan-out.** An update asks a few peers (``choose_peers``), not every peer it knows: the
  failing ones (to confirm or drop them), those asked longest ago, and a random few. News
  still reaches everyone in about log N rounds, as in any push-pull gossip.
- **A digest of versions.** Each side summarises the record versions it knows (node id and
  seq: the peers it holds, its own record, and peers it dropped lately) as ``BUCKETS`` short
  hashes, one per slice of node ids (``Versions.digest``). A peer that knows the same
  versions answers "nothing" in a few hundred bytes, whatever the table's size. Where a
  slice differs, it lists the tokens of the versions it holds there (``Versions.listing``),
  and the asker asks for the records it lacks by token (``want``).

Why buckets of hashes rather than a Bloom filter or a version per origin: a Bloom filter of
10,000 versions is 12 KB at 1% error, sent on every exchange; versions per origin need
every node to sign its record again to prove it lives, which makes every round busy. The
digest is 384 characters at any size, and a difference costs only the slices it touches.
Each slice hash is SHA-256 over the sorted ``node_id:seq`` lines, so two honest tables that
differ cannot be made to look alike by a third peer's records.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

BUCKETS = 32
BUCKET_CHARS = 12  # 9 bytes of SHA-256, base64url
DIGEST_CHARS = BUCKETS * BUCKET_CHARS
TOKEN_CHARS = 8  # one record version, in a listing or a ``want``


def record_token(node_id: object, seq: object) -> str:
    """``TOKEN_CHARS`` characters that stand for one version (node id and seq) of a record, so
    a peer can name it in a few bytes instead of the whole record."""
    digest = hashlib.sha256(f"{node_id}:{seq}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:TOKEN_CHARS * 3 // 4]).decode("ascii")


def bucket_of(node_id: str) -> int:
    """The slice of node ids ``node_id`` falls in (a node cannot pick its slice cheaply)."""
    return hashlib.sha256(node_id.encode()).digest()[0] % BUCKETS


def tokens_in(text: str) -> list[str]:
    """The tokens of a listing or a ``want`` (checked by ``wire``), in order."""
    return [text[i:i + TOKEN_CHARS] for i in range(0, len(text), TOKEN_CHARS)]


class Versions:
    """The record versions one node knows: node id -> seq. ``held`` are those whose records
    it can hand out (its peers', its own); ``gone`` those it dropped lately, which count in
    its digest (so a dropped peer does not make two tables look different) and which it
    does not ask for again."""

    def __init__(self, held: Mapping[str, int], gone: Mapping[str, int] | None = None):
        self.held = dict(held)
        self.gone = {k: v for k, v in (gone or {}).items() if k not in self.held}
        self._digest: list[str] | None = None
        self._known: set[str] | None = None
        self._tokens: dict[str, str] | None = None
        self._slices: list[list[str]] | None = None

    def without_gone(self) -> Versions:
        """These versions less those gone: a peer asked with their digest lists what it
        holds of what this node dropped, and the asker takes those records."""
        return Versions(self.held)

    def with_records(self, records: Iterable[Any]) -> Versions:
        """These versions and those of ``records`` (newer seqs win): what the asker will know
        once the records it was sent are merged."""
        held = dict(self.held)
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("node_id"), str):
                seq = record.get("seq")
                if isinstance(seq, int) and seq > held.get(record["node_id"], -1):
                    held[record["node_id"]] = seq
        return Versions(held, self.gone)

    # -- the digest --------------------------------------------------------------------------

    def buckets(self) -> list[str]:
        if self._digest is None:
            lines: list[list[str]] = [[] for _ in range(BUCKETS)]
            for source in (self.held, self.gone):
                for node_id, seq in source.items():
                    lines[bucket_of(node_id)].append(f"{node_id}:{seq}")
            self._digest = [base64.urlsafe_b64encode(hashlib.sha256(
                "\n".join(sorted(bucket)).encode()).digest()[:BUCKET_CHARS * 3 // 4]).decode()
                for bucket in lines]
        return self._digest

    def digest(self) -> str:
        """``DIGEST_CHARS`` characters: one hash per slice of node ids."""
        return "".join(self.buckets())

    def differing(self, digest: str) -> list[int]:
        """The slices where ``digest`` (another node's, checked by ``wire``) differs."""
        ours = self.buckets()
        return [b for b in range(BUCKETS)
                if digest[b * BUCKET_CHARS:(b + 1) * BUCKET_CHARS] != ours[b]]

    # -- tokens --------------------------------------------------------------------------------

    def knows(self, token: str) -> bool:
        """Whether this node knows the version ``token`` stands for (holds it, is it, or
        dropped it lately)."""
        if self._known is None:
            self._known = {record_token(n, s) for source in (self.held, self.gone)
                           for n, s in source.items()}
        return token in self._known

    def node_for(self, token: str) -> str | None:
        """The node whose held version ``token`` names (None: none held here)."""
        if self._tokens is None:
            self._tokens = {record_token(n, s): n for n, s in self.held.items()}
        return self._tokens.get(token)

    def listing(self, digest: str, limit: int) -> tuple[str, bool]:
        """The tokens of the versions held here in the slices where ``digest`` differs, at
        most ``limit`` of them, and whether more were left out."""
        slices = self.differing(digest)
        if not slices:
            return "", False
        if self._slices is None:  # kept with the versions: a server answers many askers
            self._slices = [[] for _ in range(BUCKETS)]
            for node_id, seq in self.held.items():
                self._slices[bucket_of(node_id)].append(record_token(node_id, seq))
            for tokens in self._slices:
                tokens.sort()
        # Whole slices, each sorted: an asker that got a cut listing takes what it lacks,
        # its next digest matches there, and the next listing goes on from there. A cut
        # listing starts at a random slice: slices where the asker holds more than this
        # node (nothing to take) cannot keep the others from it for good.
        if sum(len(self._slices[b]) for b in slices) > limit:
            start = random.randrange(len(slices))
            slices = slices[start:] + slices[:start]
        found: list[str] = []
        for b in slices:
            found.extend(self._slices[b])
            if len(found) > limit:
                break
        return "".join(found[:limit]), len(found) > limit


class Sync:
    """The asker's side of one digest exchange: what to send on each page, from what the
    pages before brought. First the digest; then ``want`` pages for the listed versions it
    lacks (``limit`` a page); then the digest again, only where the listing was cut."""

    def __init__(self, versions: Versions, limit: int):
        self.versions = versions
        self.limit = limit
        self.pending: list[str] = []
        self.asked: set[str] = set()
        self.wanted: list[str] = []  # the last ``want``
        self.received: list[Any] = []
        self.cut = False  # the last listing left some out
        self.sent_digest = False

    def request(self) -> dict[str, str]:
        """The fields of the next request: a ``want`` or a ``digest``."""
        if self.pending:
            want, self.pending = self.pending[:self.limit], self.pending[self.limit:]
            self.asked.update(want)
            self.wanted = want
            self.sent_digest = False
            return {"want": "".join(want)}
        if self.received:  # what came since counts as known: the listing goes on
            self.versions = self.versions.with_records(self.received)
            self.received = []
        self.sent_digest = True
        return {"digest": self.versions.digest()}

    def take(self, tokens: str, more: bool, records: list[Any]) -> bool:
        """Read one answer; whether there is more to ask."""
        self.received.extend(records)
        if self.sent_digest:
            self.pending = [t for t in dict.fromkeys(tokens_in(tokens))
                            if t not in self.asked and not self.versions.knows(t)]
            self.cut = more and bool(self.pending)  # a cut listing of known ones: stop
        elif 0 < len(records) < len(self.wanted):
            # The peer sends fewer a page than asked (its own limit): ask again for the
            # rest, that many at a time. (None at all: it holds none of them any more.)
            got = {record_token(r.get("node_id"), r.get("seq")) for r in records
                   if isinstance(r, dict)}
            self.limit = len(records)
            self.pending = [t for t in self.wanted if t not in got] + self.pending
        return bool(self.pending) or self.cut


class Asked(Protocol):
    """What ``choose_peers`` reads of an entry's measurements."""

    failures: int
    asked_at: float | None
    last_seen: float | None


def choose_peers(measured: Mapping[str, Asked], fanout: int | None,
                 rng: random.Random | None = None) -> list[str]:
    """The peers one hop of an update asks: all of them when there are no more than
    ``fanout`` (or no fan-out is set); else the failing ones (up to ``fanout`` more: a dead
    peer is confirmed and dropped within ``max_failures`` updates, a live one cleared), half
    the fan-out from those asked longest ago (peers that answered before first), and the rest
    at random."""
    if fanout is None or len(measured) <= fanout:
        return list(measured)
    rng = rng or random.Random()
    failing = [n for n, m in measured.items() if m.failures > 0]
    failing.sort(key=lambda n: measured[n].asked_at or 0.0)
    chosen = failing[:fanout]
    taken = set(chosen)
    rest = [n for n in measured if n not in taken]
    rng.shuffle(rest)  # ties among the oldest broken at random
    # Peers that answered before come first among the oldest, so that newcomers someone
    # handed over (keys are free) cannot take those places from them; newcomers get theirs
    # from the random half, or from the oldest when the table holds little else.
    rest.sort(key=lambda n: (measured[n].last_seen is None, measured[n].asked_at or 0.0))
    oldest = rest[:fanout // 2]
    others = rest[fanout // 2:]
    return chosen + oldest + rng.sample(others, min(fanout - len(oldest), len(others)))
