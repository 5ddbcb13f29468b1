"""Discovery: exchange tables with peers hop after hop, measure them, drop the dead.

The same code runs over HTTP (``HttpTransport``) and, for the benchmark, in process.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from p2prc_core.addresses import table_endpoints
from p2prc_core.asking import (
    AskLimits,
    Outcome,
    Transport,
    ask_pages,
)
from p2prc_core.channel import Channel, read_capped, within
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused, Refusal, unreachable
from p2prc_core.gossip import Versions, choose_peers, tokens_in
from p2prc_core.httplib import httpx
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint, parse_endpoint
from p2prc_core.peertable import PeerEntry, PeerTable, TableState
from p2prc_core.plugins import PluginHooks
from p2prc_core.signing import sign_request
from p2prc_core.tls import NodeMismatch
from p2prc_core.wire import (
    MAX_HAVE,
    ExchangeAnswer,
    ExchangeRequest,
    WireError,
    convert,
    encode,
)

log = logging.getLogger("p2prc.discovery")


class EmptyTableError(P2PRCError):
    """An update of a table that holds no peer: there is nobody to ask."""


class ExchangeError(Refusal):
    """A malformed exchange request (400); the message says what is wrong."""

    title = "Invalid exchange"


class HttpTransport:
    """The real thing: one connection per peer (one TLS handshake, the peer's key checked
    against its node id) for the exchange and the latency probes."""

    def __init__(self, timeout: float, max_bytes: int, secure: bool = True,
                 identity: NodeIdentity | None = None):
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.secure = secure
        # Signs a relay's connect (for a peer reached through one), and the exchange itself,
        # so the host can say whether it would host us (``ExchangeAnswer.hosts_you``).
        self.identity = identity

    def call(self, endpoint: Endpoint, body: bytes, probes: int,
             timeout: float | None = None) -> tuple[bytes, float | None]:
        """The whole call (connection, exchange, probes) ends within ``timeout`` or the
        transport's own, whichever is shorter, however slowly the peer answers
        (``channel.within``)."""
        where = str(endpoint)
        wait = min(self.timeout, timeout) if timeout is not None else self.timeout
        try:
            channel = Channel(endpoint, self.secure, identity=self.identity)
            with within(wait) as deadline, channel.http(wait) as http:
                with http.stream("POST", "/v1/peers", content=body,
                                 headers=self._headers(endpoint, body)) as resp:
                    data = read_capped(resp.iter_bytes(), self.max_bytes, lambda: PeerRefused(
                        f"{where} sent a table over {self.max_bytes} bytes", 0))
                if resp.status_code != 200:
                    raise PeerRefused(f"{where} answered the exchange with HTTP "
                                      f"{resp.status_code}", resp.status_code)
                rtts = []
                for _ in range(probes):  # the connection is open: these are round trips
                    if deadline.left() <= 0:
                        break
                    started = time.perf_counter()
                    http.get("/v1/health")
                    rtts.append((time.perf_counter() - started) * 1000)
                return data, min(rtts) if rtts else None
        except httpx.HTTPError as err:
            raise unreachable(where, err, wait) from None

    def _headers(self, endpoint: Endpoint, body: bytes) -> dict[str, str]:
        """The exchange's headers: signed for the node asked, when this node has a key and
        knows whom it asks (a host answers ``hosts_you`` only to a signed caller)."""
        headers = {"Content-Type": "application/json"}
        if self.identity is not None and endpoint.node_id is not None:
            headers.update(sign_request(self.identity, "POST", "/v1/peers", "", body,
                                        endpoint.node_id))
        return headers


@dataclass
class UpdateSummary:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    asked: int = 0
    hops: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    observed: Counter[str] = field(default_factory=Counter)  # our address, as peers saw it

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "updated": self.updated, "removed": self.removed,
                "failed": self.failed, "dropped": dict(self.dropped), "asked": self.asked,
                "hops": self.hops, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "observed": dict(self.observed)}


Progress = Callable[[int, int, int], None]  # done, total in this hop, hop


class UpdateStopped(KeyboardInterrupt):
    """Ctrl-C during an update. What the peers that had answered brought is merged and
    saved (``summary``); the ``left`` peers still being asked are as they were. Still a
    ``KeyboardInterrupt``, for code that knows nothing of it."""

    def __init__(self, summary: UpdateSummary, left: int):
        super().__init__()
        self.summary = summary
        self.left = left


class Discovery:
    """Runs updates of one node's table."""

    def __init__(self, table: PeerTable, hooks: PluginHooks, transport: Transport,
                 own_record: Callable[[], dict[str, Any]], *, concurrency: int = 16,
                 probes: int = 3, max_failures: int = 3, max_records: int = 500,
                 newcomers_per_peer: int | None = None, peer_budget: float = 15.0,
                 fanout: int | None = None, rng: random.Random | None = None):
        self.table = table
        self.hooks = hooks
        self.transport = transport
        self.own_record = own_record
        self.publish: Callable[[], bool] = lambda: True  # whether our record is handed over
        # This node's own relay hub, where this machine dials it (None: it runs none)
        self.hub: Callable[[], Endpoint | None] = lambda: None
        self.concurrency = concurrency
        self.probes = probes
        self.max_failures = max_failures
        self.max_records = max_records
        self.newcomers_per_peer = newcomers_per_peer  # new peers one answer may bring
        self.peer_budget = peer_budget  # seconds for one peer, all addresses and pages
        self.fanout = fanout  # peers one hop asks (``gossip.choose_peers``); None: all
        self.rng = rng or random.Random()

    # -- one peer ---------------------------------------------------------------------------

    def endpoints(self, entry: PeerEntry, own: dict[str, Any] | None = None,
                  hub: Endpoint | None | bool = True) -> list[Endpoint]:
        """Where to dial a peer (``addresses.dial_endpoints``: its addresses, IPv6 first; then
        the endpoint that answered last time, then its relays). A peer that waits at this
        node's own relay hub is reached through the hub on this machine (``hub``), not at the
        address its record gives for us. With ``own`` (this node's record) and a server of
        ours running, its addresses are left out: a peer's record may list them to make us
        dial ourselves. A node with no server has no address of its own to avoid (another
        node on this machine may serve at them): there the node id checked on every
        connection is what keeps a node from taking itself for a peer. ``hub``: this node's
        hub as ``self.hub()`` said (when asking for many peers at once); True: ask it."""
        hub = self.hub() if hub is True else hub or None
        found = table_endpoints(self.hooks, self.table, entry, hub)
        if own is None or not self.publish():
            return found
        ours = {Endpoint(a, own["port"]).pin_key for a in own.get("addresses", [])
                if isinstance(a, str)}
        return [e for e in found if e.pin_key not in ours
                or (hub is not None and e.relay == hub.node_id)]

    def contact(self, entry: PeerEntry, own: dict[str, Any],
                versions: Versions | None = None) -> Outcome:
        """Exchange tables with one peer, trying its endpoints in order, and measure it.
        ``versions``: what this node knows (``TableState.versions``), summed up in a digest
        so that the peer sends only what it lacks (``gossip``); without, the peer sends
        what changed since the last exchange with it (the cursor)."""
        node_id = entry.node_id
        if versions is not None and entry.measured.rejoined:
            # A peer lost (it had answered, then failed) and back: the failures were likely
            # a cut between us, and what was dropped with it may be alive too. What it holds
            # of those comes back as newcomers, to be asked (and dropped again if dead).
            versions = versions.without_gone()
        endpoints = self.endpoints(entry, own)
        if not endpoints:
            return Outcome(node_id, False, error="no address this node may dial")
        errors = []
        deadline = time.monotonic() + self.peer_budget
        for endpoint in endpoints:
            if time.monotonic() >= deadline:
                errors.append(f"gave up after {self.peer_budget:g} s")
                break
            try:
                outcome = ask_pages(self.transport, endpoint, entry, own, AskLimits(
                    deadline, self.peer_budget, self.max_records, self.probes,
                    self.publish()), versions)
            except PeerRefused as err:
                return Outcome(node_id, False, endpoint=endpoint.path, error=str(err))
            except PeerError as err:
                errors.append(str(err))
                continue
            return outcome
        return Outcome(node_id, False, error="; ".join(errors))

    def add(self, endpoint: Endpoint, record: dict[str, Any]) -> UpdateSummary:
        """Add the (verified) record fetched from ``endpoint``, remembering that address even
        if the record does not list it; then exchange tables with it and measure it."""
        def change(state: TableState) -> None:
            result = self.table.merge_into(state, [record], check_addresses=False)
            if result.dropped:
                reason = ", ".join(result.dropped)
                raise PeerError(f"{endpoint} sent a record this node refuses ({reason})")
            state.peers[record["node_id"]].measured.address = endpoint.path

        self.table.update(change)
        return self.update(hops=1, only=[record["node_id"]])

    def bootstrap(self, peers: list[str], fetch_record: Callable[[Endpoint],
                                                                   dict[str, Any]]) -> None:
        """Add the configured bootstrap peers (``ADDRESS[:PORT]``) that the table does not
        hold yet; ``fetch_record`` asks one for its verified record."""
        held = {e.measured.address for e in self.table.load().values()}
        for text in peers:
            endpoint = parse_endpoint(text)
            if endpoint.path in held:
                continue
            try:
                self.add(endpoint, fetch_record(endpoint))
            except P2PRCError as err:
                log.warning("bootstrap peer %s: %s", endpoint, err)

    # -- a whole update ---------------------------------------------------------------------

    def update(self, hops: int, progress: Progress | None = None,
               only: list[str] | None = None) -> UpdateSummary:
        """Ask ``fanout`` known peers (``gossip.choose_peers``; or ``only`` these), then as
        many of those just learned of, ``hops`` deep.

        The table is read once to start, then read and written once per hop (under its
        lock, merging what that hop learned); pruning is part of the last write.

        :raises EmptyTableError: the table is empty.
        :raises UpdateStopped: Ctrl-C; what had come back is saved, the table whole.
        """
        summary = UpdateSummary()
        own = self.own_record()
        state = self.table.snapshot()
        if not state.peers:
            raise EmptyTableError("the table is empty: add a peer first with 'p2prc peers "
                                  "add ADDRESS'")
        asked: set[str] = set()
        frontier = [n for n in only if n in state.peers] if only is not None \
            else self._choose(state, list(state.peers))
        pruned = False
        for hop in range(1, hops + 1):
            if not frontier:
                break
            summary.hops = hop
            entries = [state.peers[n] for n in frontier]
            asked.update(frontier)
            outcomes, stopped = self._contact_all(entries, own, state.versions(own), hop,
                                                  progress)
            summary.asked += len(outcomes)
            if stopped:  # keep what came back; the peers still being asked stay as they were
                self.table.update(partial(self._apply, outcomes=outcomes, summary=summary))
                raise UpdateStopped(summary, len(entries) - len(outcomes))

            def merge(current: TableState, outcomes: list[Outcome] = outcomes,
                      last: bool = hop == hops) -> tuple[TableState, list[str], bool]:
                added = self._apply(current, outcomes, summary)
                following = self._choose(current, [n for n in added if n not in asked
                                                   and n in current.peers])
                if last or not following:  # the last write of this update also prunes
                    summary.removed = self._prune(current, summary)
                return current, following, last or not following

            state, frontier, pruned = self.table.update(merge)
        if not pruned:
            summary.removed = self.table.update(partial(self._prune, summary=summary))
        return summary

    def _choose(self, state: TableState, among: list[str]) -> list[str]:
        """The peers of ``among`` one hop asks (``gossip.choose_peers``)."""
        return choose_peers({n: state.peers[n].measured for n in among}, self.fanout,
                            self.rng)

    def _contact_all(self, entries: list[PeerEntry], own: dict[str, Any],
                     versions: Versions, hop: int,
                     progress: Progress | None) -> tuple[list[Outcome], bool]:
        """Ask ``entries`` on up to ``concurrency`` threads; returns their outcomes in the
        order asked, and whether Ctrl-C stopped it (then only those that had come back).
        The threads are daemons: a slow peer holds up neither the stop nor the exit."""
        total = len(entries)
        if progress:
            progress(0, total, hop)
        todo: queue.SimpleQueue[tuple[int, PeerEntry]] = queue.SimpleQueue()
        for item in enumerate(entries):
            todo.put(item)
        done: queue.SimpleQueue[tuple[int, Outcome | BaseException]] = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                try:
                    index, entry = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((index, self.contact(entry, own, versions)))
                except BaseException as err:  # noqa: BLE001 - raised on the asking thread
                    done.put((index, err))

        for _ in range(min(self.concurrency, total)):
            threading.Thread(target=work, name="p2prc-update", daemon=True).start()
        found: dict[int, Outcome] = {}
        stopped = False
        try:
            while len(found) < total:
                index, got = done.get()  # Ctrl-C interrupts this wait at once
                if isinstance(got, BaseException):
                    raise got
                found[index] = got
                if progress:
                    progress(len(found), total, hop)
        except KeyboardInterrupt:
            stopped = True
        finally:
            stop.set()
        return [found[i] for i in sorted(found)], stopped

    def _apply(self, state: TableState, outcomes: list[Outcome],
               summary: UpdateSummary) -> list[str]:
        now = int(time.time())
        added: list[str] = []
        for outcome in outcomes:  # first: every peer that answered as itself has answered,
            entry = state.peers.get(outcome.node_id)  # so no newcomer pushes it out below
            if entry is not None and outcome.ok and outcome.as_itself:
                entry.measured.last_seen = now
        for outcome in outcomes:
            summary.bytes_sent += outcome.sent
            summary.bytes_received += outcome.received
            entry = state.peers.get(outcome.node_id)
            if entry is None:
                continue  # removed meanwhile
            measured = entry.measured
            measured.asked_at = now
            if not outcome.ok:
                measured.failures += 1
                summary.failed[outcome.node_id] = outcome.error
                continue
            incoming = list(outcome.records)
            if outcome.node is not None:
                if not outcome.as_itself:
                    # Another node answered at its address (only possible without TLS): take
                    # nothing from it, and count it as a failure of the peer we meant.
                    summary.dropped["impostor"] += 1
                    measured.failures += 1
                    summary.failed[outcome.node_id] = f"{outcome.endpoint} is another node"
                    continue
                incoming.append(outcome.node)
            result = self.table.merge_into(state, incoming, admit=self._admit_from_a_peer)
            summary.dropped.update(result.dropped)
            for node_id in result.added:
                summary.added.append(node_id)
                added.append(node_id)
            summary.updated.extend(n for n in result.updated if n not in summary.updated)
            if outcome.observed is not None:
                summary.observed[outcome.observed] += 1
                state.observe(outcome.observed, outcome.node_id, now)
            if outcome.latency_ms is not None:  # unmeasured (no time left to probe): the
                measured.latency_ms = round(outcome.latency_ms, 3)  # last figure stands
            measured.last_seen = now
            measured.failures = 0
            measured.rejoined = None
            measured.address = outcome.endpoint
            if outcome.hosts_us is not None:
                measured.hosts_us, measured.hosts_us_at = outcome.hosts_us, now
            if not result.dropped.get("rate-limited"):  # else ask again from the old cursor
                measured.cursor = outcome.cursor
            measured.holds_our_seq = outcome.holds_our_seq if isinstance(
                outcome.holds_our_seq, int) and not isinstance(outcome.holds_our_seq, bool) \
                else None
        return added

    def _admit_from_a_peer(self, wanted: int) -> int:
        """How many new peers one peer's answer may bring into the table in one update."""
        limit = self.newcomers_per_peer
        return wanted if limit is None else min(wanted, limit)

    def _prune(self, state: TableState, summary: UpdateSummary) -> list[str]:
        """Drop the peers that failed ``max_failures`` updates in a row. They count as gone
        (``TableState.drop``: not fetched again for a while) only when some peer answered
        in this update: when none did, this node's own network is the likelier cause, and
        the first peer that answers again brings the others back. One that had answered
        before is lost: if it comes back, it brings back those lost with it (``contact``)."""
        dead = [n for n, e in state.peers.items() if e.measured.failures >= self.max_failures]
        answered = summary.asked > len(summary.failed)
        for node_id in dead:
            if answered:
                state.drop(node_id, lost=state.peers[node_id].measured.last_seen is not None)
            else:
                del state.peers[node_id]
                state.changed_records()
        state.forget_gone(self.table.max_gone)
        return dead


def handle_exchange(table: PeerTable, own_record: dict[str, Any], body: Any,
                    max_records: int, admit: Callable[[int], int] | None = None,
                    observed: str | None = None) -> ExchangeAnswer:
    """The server's side of an exchange (``wire.ExchangeRequest``, answered with a
    ``wire.ExchangeAnswer``, which the server writes with ``wire.encode``): merge what the
    caller sent, answer with what changed since its cursor (never the caller's own record),
    and our record if its seq is newer than the one the caller holds.

    :raises ExchangeError: the request is malformed (the message says how).
    """
    try:
        request = convert(body, ExchangeRequest)
    except WireError as err:
        raise ExchangeError(str(err)) from None
    if len(request.records) > max_records:
        raise ExchangeError(f"'records' must be a list of at most {max_records} records")
    records, caller = request.records, request.from_
    limit = min(request.limit if request.limit is not None else max_records, max_records)

    def answer(state: TableState) -> ExchangeAnswer:
        """Merge and answer from one reading of the table."""
        result = table.merge_into(state, records, admit=admit) if records else None
        if request.digest or request.want:
            reply = _by_digest(state, own_record, request, limit, caller)
        else:  # an older caller: what changed since its cursor, less what it has
            changed, cursor, more = state.changes_since(request.since, limit,
                                                        request.have_tokens())
            reply = ExchangeAnswer(records=changed, cursor=cursor, more=more)
        reply.records = [r for r in reply.records if r.get("node_id") != caller]
        if request.known_seq != own_record.get("seq"):
            reply.node = own_record
        if result is not None:
            reply.accepted = len(result.added) + len(result.updated) + result.unchanged
        if caller is not None:
            held = state.peers.get(caller)
            reply.holds_seq = held.record["seq"] if held else None
        reply.observed = observed  # the address the caller's request came from
        return reply

    # Only a request that hands over records takes the table's lock (and may write it).
    return table.update(answer) if records else answer(table.snapshot())


def _by_digest(state: TableState, own_record: dict[str, Any], request: ExchangeRequest,
               limit: int, caller: str | None) -> ExchangeAnswer:
    """The records the caller wants (by token, at most ``limit``), and the listing of the
    slices where its digest differs from what this node knows (``gossip``)."""
    versions = state.versions(own_record)
    found: list[dict[str, Any]] = []
    for token in dict.fromkeys(tokens_in(request.want)):
        node_id = versions.node_for(token)
        if node_id is None or node_id == caller:
            continue  # gone meanwhile, never held, or the caller's own
        found.append(own_record if node_id == own_record.get("node_id")
                     else state.peers[node_id].record)
        if len(found) == limit:
            break
    tokens, more = versions.listing(request.digest, MAX_HAVE) if request.digest else ("", False)
    return ExchangeAnswer(records=found, cursor=state.cursor(), more=more, tokens=tokens)


def refresh_job(discovery: Discovery, hops: int,
                bootstrap: Callable[[], None]) -> Callable[[], UpdateSummary | None]:
    """What a running server does every ``refresh_seconds`` (see ``periodic.Periodic``)."""
    def job() -> UpdateSummary | None:
        bootstrap()
        try:
            summary = discovery.update(hops)
        except EmptyTableError:
            return None  # nobody to ask yet
        log.info("peer table refreshed: %d asked, %d added, %d updated, %d removed, "
                 "%d failed", summary.asked, len(summary.added), len(summary.updated),
                 len(summary.removed), len(summary.failed))
        return summary
    return job


class InProcessTransport:
    """Runs the exchange in this process against other nodes' tables: the same request and
    answer bytes as over HTTP, without sockets. For simulations and the benchmark."""

    def __init__(self) -> None:
        self.nodes: dict[Endpoint, tuple[PeerTable, Callable[[], dict[str, Any]]]] = {}
        self.down: set[Endpoint] = set()
        self.latency_ms: dict[Endpoint, float] = {}
        self.bytes_served: Counter[Endpoint] = Counter()
        self.max_records = 500

    def serve(self, endpoint: Endpoint, table: PeerTable,
              own_record: Callable[[], dict[str, Any]]) -> None:
        self.nodes[endpoint] = (table, own_record)

    def call(self, endpoint: Endpoint, body: bytes, probes: int,
             timeout: float | None = None) -> tuple[bytes, float | None]:
        if endpoint not in self.nodes or endpoint in self.down:
            raise PeerError(f"cannot reach {endpoint}: connection refused")
        table, own_record = self.nodes[endpoint]
        presented = own_record()["node_id"]  # what a TLS handshake would show
        if endpoint.node_id is not None and presented != endpoint.node_id:
            raise NodeMismatch(endpoint, endpoint.node_id, presented)
        try:
            answer = handle_exchange(table, own_record(), json.loads(body), self.max_records)
        except ExchangeError as err:
            raise PeerRefused(f"{endpoint} refused (400): {err}", 400) from None
        raw = encode(answer)
        self.bytes_served[endpoint] += len(raw)
        return raw, self.latency_ms.get(endpoint, 1.0) if probes else None
