"""One exchange with one peer at one of its endpoints: the pages of requests and answers,
and what they brought (``Outcome``). ``discovery.Discovery`` runs one per peer it asks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.gossip import Sync, Versions
from p2prc_core.models import Endpoint
from p2prc_core.peertable import PeerEntry
from p2prc_core.wire import ExchangeAnswer, ExchangeRequest, WireError, decode, encode

MAX_PAGES = 20  # pages of one exchange with one peer


class Transport(Protocol):
    def call(self, endpoint: Endpoint, body: bytes, probes: int,
             timeout: float | None = None) -> tuple[bytes, float | None]:
        """POST ``body`` to the peer's ``/v1/peers``; return the answer and the latency (ms),
        the minimum of ``probes`` round trips (None for none). ``timeout`` (seconds) bounds
        the whole call, when given.

        :raises PeerRefused: the peer answered with an error.
        :raises PeerError: the peer could not be reached at this endpoint, or another node
            than ``endpoint.node_id`` answered there.
        """
        ...


@dataclass
class Outcome:
    """What one peer's exchange gave."""

    node_id: str
    ok: bool
    endpoint: str = ""
    latency_ms: float | None = None
    records: list[Any] = field(default_factory=list)
    node: Any = None
    cursor: str | None = None
    error: str = ""
    holds_our_seq: Any = None
    observed: str | None = None  # the address the peer saw our request come from
    hosts_us: bool | None = None  # whether it says it would start a container for us
    sent: int = 0
    received: int = 0

    @property
    def as_itself(self) -> bool:
        """Whether the node that answered is the one asked (no record sent counts as yes:
        it is sent only when it changed). Only without TLS can it be another."""
        return self.node is None or (isinstance(self.node, dict)
                                     and self.node.get("node_id") == self.node_id)


@dataclass(frozen=True)
class AskLimits:
    """What one exchange may spend, and whether this node hands over its record."""

    deadline: float  # time.monotonic() by which the peer's budget is spent
    budget: float  # that budget, in seconds (for the message)
    max_records: int
    probes: int
    publish: bool  # a server of ours runs to be dialled at our record's addresses


def ask_pages(transport: Transport, endpoint: Endpoint, entry: PeerEntry,
              own: dict[str, Any], limits: AskLimits,
              versions: Versions | None) -> Outcome:
    """Exchange tables with ``entry``'s node at ``endpoint``, page after page: by digest
    when ``versions`` is given and the peer speaks it (``gossip.Sync``), else by cursor.

    :raises PeerRefused: the peer refused, or answered in a form not allowed.
    :raises PeerError: the peer could not be reached there, or the budget ran out.
    """
    measured = entry.measured
    outcome = Outcome(entry.node_id, False, endpoint=endpoint.path)
    cursor = measured.cursor
    # Hand over our record only when the peer does not hold this version of it (it
    # says which it holds in each answer), and only when a server of ours runs to be
    # dialled at it. Not knowing, ask first: most peers hold it already.
    send_own = measured.holds_our_seq not in (None, own["seq"]) and limits.publish
    handed = False
    sync = Sync(versions, limits.max_records) if versions is not None else None
    more = True
    for page_number in range(MAX_PAGES):
        if not (more or send_own):
            break
        left = limits.deadline - time.monotonic()
        if left <= 0:
            raise PeerError(f"{endpoint}: gave up after {limits.budget:g} s")
        # A page that only hands over our record asks what changed since the
        # cursor just answered: nothing, or little.
        asking = sync.request() if sync is not None and more else {}
        body = encode(ExchangeRequest(
            from_=own["node_id"], records=[own] if send_own else [],
            since=cursor, known_seq=entry.record["seq"], limit=limits.max_records,
            **asking))
        # Latency is probed with the first page only.
        probes = limits.probes if page_number == 0 else 0
        raw, latency = transport.call(endpoint, body, probes, left)
        outcome.sent += len(body)
        outcome.received += len(raw)
        page = parse_answer(raw, limits.max_records, str(endpoint))
        outcome.records.extend(page.records)
        outcome.node = page.node or outcome.node
        outcome.holds_our_seq = page.holds_seq
        outcome.observed = page.observed or outcome.observed
        if page.hosts_you is not None:
            outcome.hosts_us = page.hosts_you
        handed, send_own = handed or send_own, False
        cursor = page.cursor
        if latency is not None:
            outcome.latency_ms = latency
        if sync is not None and page.tokens is not None:  # a digest's answer
            more = sync.take(page.tokens, page.more, page.records)
        else:  # an older node's (it pages by cursor), or a page that only handed
            more = page.more and (sync is None or bool(asking))  # over ours
        send_own = not handed and page.holds_seq != own["seq"] and limits.publish

    outcome.ok = True
    outcome.cursor = cursor
    return outcome


def parse_answer(raw: bytes, max_records: int, where: str) -> ExchangeAnswer:
    """Check an exchange answer (``wire.ExchangeAnswer``); anything else is a refusal, never
    a crash."""
    try:
        answer = decode(raw, ExchangeAnswer)
    except WireError as err:
        raise PeerRefused(f"{where} answered the exchange in an unknown form ({err})",
                          0) from None
    if len(answer.records) > max_records:
        raise PeerRefused(f"{where} sent {len(answer.records)} records, over the "
                          f"{max_records} allowed", 0)
    return answer
