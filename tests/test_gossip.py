"""A refresh whose cost does not grow with the network (``gossip``): the digest of versions,
the listing and ``want``, the fan-out, and what hostile peers can do with them. Runs the real
Discovery, PeerTable and exchange code over the in-process transport (the same bytes as
HTTP); test_netns.py and test_natlab.py run the same exchanges over real sockets."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import BUILTINS
from p2prc_core.asking import MAX_PAGES
from p2prc_core.discovery import (
    Discovery,
    ExchangeError,
    InProcessTransport,
    handle_exchange,
)
from p2prc_core.errors import PeerRefused
from p2prc_core.gossip import (
    BUCKETS,
    DIGEST_CHARS,
    TOKEN_CHARS,
    Versions,
    bucket_of,
    choose_peers,
    record_token,
)
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.peertable import GONE_SECONDS, Measured, PeerTable
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.records import sign_record
from p2prc_core.wire import MAX_HAVE, ExchangeAnswer, encode

HOOKS = make_plugin_manager(load_entrypoints=False, plugins=BUILTINS)


class Node:
    """One node: a key, a record it signs again when it changes, a table on disk."""

    def __init__(self, root: Path, index: int, transport: InProcessTransport | None = None,
                 fanout: int | None = None):
        self.identity = NodeIdentity.generate()
        self.index = index
        self.seq = 1
        self.own = self._sign()
        self.table = PeerTable(root / f"n{index}", self.identity.node_id)
        self.endpoint = Endpoint(self.address, 8088, self.identity.node_id)
        self.discovery = Discovery(self.table, HOOKS, transport, lambda: self.own,
                                   fanout=fanout, rng=random.Random(index))
        if transport is not None:
            transport.serve(Endpoint(self.address, 8088), self.table, lambda: self.own)

    @property
    def address(self) -> str:
        return f"2001:db8::{self.index + 1:x}"

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def _sign(self) -> dict[str, Any]:
        return sign_record(self.identity, {
            "name": f"n{self.index}", "addresses": [self.address], "port": 8088,
            "seq": self.seq, "time": int(time.time()), "specs": {}, "metadata": {},
            "version": "test"})

    def change(self) -> None:
        """The node changes its record (a new address, new specs): its seq grows."""
        self.seq += 1
        self.own = self._sign()


def records(count: int) -> list[dict[str, Any]]:
    now = int(time.time())
    return [sign_record(NodeIdentity.generate(), {
        "name": f"r{i}", "addresses": [f"2001:db8:1::{i + 1:x}"], "port": 8088, "seq": 1,
        "time": now, "specs": {}, "metadata": {}, "version": "test"}) for i in range(count)]


def pair(tmp_path: Path, shared: list[dict[str, Any]]) -> tuple[Node, Node, InProcessTransport]:
    """Two nodes that know each other and ``shared``."""
    transport = InProcessTransport()
    a, b = Node(tmp_path, 0, transport), Node(tmp_path, 1, transport)
    a.table.merge([*shared, b.own])
    b.table.merge([*shared, a.own])
    return a, b, transport


def exchange(a: Node, b: Node) -> Any:
    """``a`` asks ``b`` once (its first exchange hands over its record: done before)."""
    return a.discovery.update(hops=1, only=[b.node_id])


# -- the digest ---------------------------------------------------------------------------


def test_a_quiet_exchange_costs_the_same_whatever_the_table_holds(tmp_path: Path) -> None:
    """Two peers that know the same versions confirm it in under 1 KB, at 20 peers and at
    1,000 alike (before, each exchange carried 8 bytes per peer held)."""
    costs = {}
    for size in (20, 1000):
        a, b, _ = pair(tmp_path / str(size), records(size))
        exchange(a, b)  # hands over a's record to b (b held it already: nothing sent)
        quiet = exchange(a, b)
        assert quiet.failed == {} and quiet.added == [] and quiet.updated == []
        costs[size] = quiet.bytes_sent + quiet.bytes_received
    assert costs[1000] < 1024, costs
    assert abs(costs[1000] - costs[20]) < 16, costs  # numbers' digits, not the table's size


def test_a_peer_lacking_one_version_gets_that_record_and_no_other(tmp_path: Path) -> None:
    shared = records(300)
    a, b, transport = pair(tmp_path, shared)
    exchange(a, b)
    newer = Node(tmp_path, 7)
    b.table.merge([newer.own])  # news at b: one new peer ...
    newer.change()
    changed = newer.own
    b.table.merge([changed])  # ... which then changed its record
    summary = exchange(a, b)
    assert summary.added == [newer.node_id]
    assert a.table.load()[newer.node_id].record["seq"] == 2
    # The listing of one slice (about 300 / 32 tokens) and one record, not the table.
    assert summary.bytes_received < 2 * len(json.dumps(changed)) + 300 // BUCKETS * 2 * TOKEN_CHARS
    assert exchange(a, b).bytes_received < 200  # and then they agree again


def test_an_exchange_goes_both_ways_over_two_updates(tmp_path: Path) -> None:
    """Each side learns what only the other held: ``a`` by asking, ``b`` when it asks."""
    a, b, _ = pair(tmp_path, records(10))
    only_a, only_b = records(3), records(4)
    a.table.merge(only_a)
    b.table.merge(only_b)
    exchange(a, b)
    exchange(b, a)
    assert set(a.table.load()) == (set(b.table.load()) | {b.node_id}) - {a.node_id}
    assert {r["node_id"] for r in only_a} <= set(b.table.load())
    assert {r["node_id"] for r in only_b} <= set(a.table.load())


def test_a_table_larger_than_one_listing_comes_whole_in_one_exchange(tmp_path: Path) -> None:
    """A newcomer with an empty table asks a peer that holds more versions than one listing
    carries (MAX_HAVE): the listing comes in whole slices, the next picks up where the
    first ended, and all of it arrives within MAX_PAGES pages."""
    count = MAX_HAVE + 600
    transport = InProcessTransport()
    old, new = Node(tmp_path, 0, transport), Node(tmp_path, 1, transport)
    old.table.merge(records(count))
    new.table.merge([old.own])
    summary = exchange(new, old)
    assert len(summary.added) == count and summary.failed == {}
    assert len(new.table.load()) == count + 1


def test_a_dropped_peer_is_not_fetched_again_and_does_not_make_tables_differ(
        tmp_path: Path) -> None:
    """A peer this node dropped as dead stays out while others still hold it (their word is
    not proof of life), and an exchange with them stays quiet; a newer record of it, or its
    own word, brings it back."""
    a, b, transport = pair(tmp_path, records(30))
    dead = Node(tmp_path, 5, transport)
    a.table.merge([dead.own])
    b.table.merge([dead.own])
    transport.down.add(Endpoint(dead.address, 8088))
    for _ in range(3):  # b answers: the network works, the fault is the dead peer's
        a.discovery.update(hops=1, only=[dead.node_id, b.node_id])
    assert dead.node_id not in a.table.load()
    assert dead.node_id in a.table.snapshot().gone
    exchange(a, b)
    quiet = exchange(a, b)
    assert dead.node_id not in a.table.load() and quiet.bytes_received < 200
    dead.change()  # it comes back, with a new version of its record
    b.table.merge([dead.own])
    assert exchange(a, b).added == [dead.node_id]
    assert dead.node_id not in a.table.snapshot().gone


def test_a_peer_back_after_a_cut_brings_back_the_peers_lost_with_it(tmp_path: Path) -> None:
    """A cut hides b and c from a for ``max_failures`` updates while d still answers (so the
    fault looks like theirs): a drops both, and counts their versions as gone. Healed, b is
    added again (a bootstrap peer, or by hand): its answer in person brings c back too. (It
    did not: d and b hold c at the version a counts as gone, so their digests matched a's
    and c stayed out for ``GONE_SECONDS``, an hour.)"""
    transport = InProcessTransport()
    a, b, c, d = (Node(tmp_path, i, transport) for i in range(4))
    for node in (a, b, c, d):
        node.table.merge([n.own for n in (a, b, c, d) if n is not node])
    a.discovery.update(hops=1)  # each has answered a once
    transport.down.update(Endpoint(n.address, 8088) for n in (b, c))
    for _ in range(3):
        a.discovery.update(hops=1)
    assert set(a.table.load()) == {d.node_id}
    assert {b.node_id, c.node_id} <= set(a.table.snapshot().gone)
    transport.down.clear()
    assert a.discovery.update(hops=1).added == []  # d's word: c and b stay out
    a.discovery.add(Endpoint(b.address, 8088), b.own)
    assert set(a.table.load()) == {b.node_id, c.node_id, d.node_id}
    assert a.table.snapshot().gone == {}
    assert a.table.load()[c.node_id].measured.last_seen is None  # b's word: c is to be asked
    again = a.discovery.update(hops=1)
    assert again.failed == {} and a.table.load()[c.node_id].measured.last_seen is not None


def test_a_peer_dropped_for_another_reason_brings_back_nothing_in_person(
        tmp_path: Path) -> None:
    """Only a peer lost to failures (it had answered) marks a cut: one forgotten by hand, or
    one that never answered, comes back alone, and its exchange stays quiet."""
    a, b, transport = pair(tmp_path, [])
    dead = Node(tmp_path, 5, transport)
    for node in (a, b):
        node.table.merge([dead.own])
    transport.down.add(Endpoint(dead.address, 8088))
    for _ in range(3):  # dead never answered a: dropped, but not lost
        a.discovery.update(hops=1)
    assert dead.node_id in a.table.snapshot().gone
    assert a.table.forget(b.node_id)
    a.discovery.add(Endpoint(b.address, 8088), b.own)
    assert dead.node_id not in a.table.load()
    assert exchange(a, b).bytes_received < 200


def test_a_forgotten_peer_is_not_brought_back_by_the_next_exchange(tmp_path: Path) -> None:
    a, b, _ = pair(tmp_path, [])
    other = Node(tmp_path, 3)
    a.table.merge([other.own])
    b.table.merge([other.own])
    assert a.table.forget(other.node_id)
    exchange(a, b)
    assert other.node_id not in a.table.load()


def test_versions_gone_are_forgotten_after_a_while_and_beyond_the_table_size(
        tmp_path: Path) -> None:
    table = PeerTable(tmp_path, "me")
    table.merge(records(5))

    def drop_all(state: Any) -> None:
        for number, node_id in enumerate(list(state.peers)):
            state.drop(node_id, now=1000.0 + number)
        state.forget_gone(3, now=1010.0)

    table.update(drop_all)
    assert sorted(w for _, w in table.snapshot().gone.values()) == [1002.0, 1003.0, 1004.0]
    table.update(lambda state: state.forget_gone(3, now=1003.5 + GONE_SECONDS))
    assert list(table.snapshot().gone.values()) == [[1, 1004.0]]


def test_the_digest_differs_exactly_in_the_slice_that_changed() -> None:
    held = {r["node_id"]: 1 for r in records(100)}
    before = Versions(held)
    moved = next(iter(held))
    after = Versions({**held, moved: 2})
    assert len(before.digest()) == DIGEST_CHARS
    assert after.differing(before.digest()) == [bucket_of(moved)]
    assert Versions(held).differing(before.digest()) == []
    listing, cut = after.listing(before.digest(), MAX_HAVE)
    assert record_token(moved, 2) in [listing[i:i + TOKEN_CHARS]
                                      for i in range(0, len(listing), TOKEN_CHARS)]
    assert not cut and not before.knows(record_token(moved, 2))


# -- the fan-out ----------------------------------------------------------------------------


def test_a_small_table_is_asked_whole_and_a_large_one_a_few_at_a_time() -> None:
    few = {str(i): Measured() for i in range(4)}
    assert choose_peers(few, 4) == list(few)
    many = {str(i): Measured(asked_at=float(i), last_seen=float(i)) for i in range(100)}
    many["new"] = Measured()
    many["failing"] = Measured(failures=1, asked_at=500.0, last_seen=400.0)
    chosen = choose_peers(many, 4, random.Random(1))
    assert chosen[0] == "failing"  # confirmed or dropped soon: not left to chance
    assert chosen[1:3] == ["0", "1"]  # then the peers that answered, asked longest ago
    assert len(chosen) == 5 and len(set(chosen)) == 5
    # the random part differs from one update to the next
    assert len({tuple(choose_peers(many, 4, random.Random(s))) for s in range(10)}) > 1
    only_new = {str(i): Measured() for i in range(10)}  # a fresh table: newcomers only
    assert len(choose_peers(only_new, 4, random.Random(1))) == 4


def test_newcomers_handed_over_in_numbers_cannot_crowd_out_the_peers_that_answered() -> None:
    """100 peers that answered before, and 1,000 newcomers a hostile peer handed over (keys
    are free): at least half of every update's places still go to the peers that answered,
    and every one of them is asked within 100 updates."""
    rng = random.Random(3)
    honest = {f"h{i}": Measured(asked_at=float(i), last_seen=float(i)) for i in range(100)}
    sybils = {f"s{i}": Measured() for i in range(1000)}
    asked = set()
    for update in range(100):
        chosen = choose_peers({**honest, **sybils}, 4, rng)
        assert sum(n in honest for n in chosen) >= 2
        for node_id in chosen:
            if node_id in honest:
                honest[node_id].asked_at = 1000.0 + update
                asked.add(node_id)
    assert len(asked) == 100


def test_news_reaches_every_node_within_log2_n_plus_2_rounds(tmp_path: Path) -> None:
    """64 nodes that each ask 4 peers a round: one node's changed record reaches all of
    them within ceil(log2 64) + 2 = 8 rounds, and each quiet exchange stays under 1 KB."""
    count = 64
    transport = InProcessTransport()
    nodes = [Node(tmp_path, i, transport, fanout=4) for i in range(count)]
    everyone = [n.own for n in nodes]
    for node in nodes:
        node.table.merge(everyone)
        node.table.update(lambda s: [setattr(e.measured, "holds_our_seq", 1)
                                     for e in s.peers.values()])
    quiet = nodes[0].discovery.update(hops=1)
    assert quiet.asked == 4 and quiet.bytes_sent + quiet.bytes_received < 4 * 1024
    source = nodes[count // 2]
    source.change()
    rounds = 0
    order = list(nodes)
    rng = random.Random(7)
    while any(n.table.load()[source.node_id].record["seq"] != 2
              for n in nodes if n is not source):
        rounds += 1
        assert rounds <= math.ceil(math.log2(count)) + 2, f"not everywhere after {rounds}"
        rng.shuffle(order)
        for node in order:
            node.discovery.update(hops=1)


# -- hostile peers -------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "words"), [
    ("digest", "A" * (DIGEST_CHARS - 1), "'digest' must be"),
    ("digest", "!" * DIGEST_CHARS, "'digest' must be"),
    ("want", "A" * (TOKEN_CHARS + 1), "'want' must be"),
    ("want", "A" * (TOKEN_CHARS * (MAX_HAVE + 1)), "'want'"),
    ("want", "\u00e9" * TOKEN_CHARS, "'want' must be"),
])
def test_a_malformed_digest_or_want_is_refused(tmp_path: Path, field: str, value: str,
                                               words: str) -> None:
    table = PeerTable(tmp_path, "me")
    with pytest.raises(ExchangeError, match=words):
        handle_exchange(table, {"node_id": "me", "seq": 1}, {field: value}, 100)


def test_a_want_names_only_what_this_node_holds(tmp_path: Path) -> None:
    """Tokens this node does not hold get nothing; the caller's own record is never sent
    back; the answer carries at most ``limit`` records however many are wanted."""
    table = PeerTable(tmp_path, "me")
    held = records(20)
    table.merge(held)
    own = {"node_id": "me", "seq": 1}
    want = "".join(record_token(r["node_id"], 1) for r in held) + "AAAAAAAA" * 50
    answer = handle_exchange(table, own, {"want": want, "limit": 5, "from": held[0]["node_id"]},
                             100)
    assert [r["node_id"] for r in answer.records] == [r["node_id"] for r in held[1:6]]
    assert answer.tokens == ""  # no digest asked: no listing


class Liar:
    """A peer that answers every exchange with a listing of versions nobody holds (all of
    them unknown to the asker) and no record, or with a broken listing."""

    def __init__(self, tokens: str):
        self.tokens = tokens
        self.calls = 0

    def call(self, endpoint: Endpoint, body: bytes, probes: int,
             timeout: float | None = None) -> tuple[bytes, float | None]:
        self.calls += 1
        raw = json.dumps({"records": [], "cursor": "x:1", "more": True, "tokens": self.tokens})
        return raw.encode(), 1.0


def test_a_listing_of_versions_nobody_holds_costs_bounded_pages(tmp_path: Path) -> None:
    junk = "".join(record_token(f"nobody{i}", 1) for i in range(MAX_HAVE))
    liar = Liar(junk)
    me = PeerTable(tmp_path, "me")
    peer = Node(tmp_path, 1)
    me.merge([peer.own])
    discovery = Discovery(me, HOOKS, liar, lambda: {"node_id": "me", "seq": 1, "port": 1})
    summary = discovery.update(hops=1)
    assert summary.failed == {} and summary.added == []
    assert liar.calls <= MAX_PAGES
    assert set(me.load()) == {peer.node_id}


@pytest.mark.parametrize("tokens", ["abc", "!!!!!!!!", "A" * (TOKEN_CHARS * MAX_HAVE + 8)])
def test_a_broken_listing_is_a_failure_of_that_peer_and_nothing_else(tmp_path: Path,
                                                                     tokens: str) -> None:
    me = PeerTable(tmp_path, "me")
    peer = Node(tmp_path, 1)
    me.merge([peer.own])
    discovery = Discovery(me, HOOKS, Liar(tokens), lambda: {"node_id": "me", "seq": 1, "port": 1})
    summary = discovery.update(hops=1)
    assert "unknown form" in summary.failed[peer.node_id]
    assert me.load()[peer.node_id].measured.failures == 1


def test_an_answer_without_tokens_is_read_as_an_older_node_pages_by_cursor(
        tmp_path: Path) -> None:
    """A node of the version before this one ignores ``digest`` and answers what changed
    since the cursor: that still works, page after page."""
    class Older(InProcessTransport):
        def call(self, endpoint: Endpoint, body: bytes, probes: int,
                 timeout: float | None = None) -> tuple[bytes, float | None]:
            request = json.loads(body)
            request.pop("digest", None)
            request.pop("want", None)
            return super().call(endpoint, json.dumps(request).encode(), probes, timeout)

    transport = Older()
    transport.max_records = 7
    a, b = Node(tmp_path, 0, transport), Node(tmp_path, 1, transport)
    a.discovery.max_records = 7
    b.table.merge(records(30))
    a.table.merge([b.own])
    assert len(exchange(a, b).added) == 30
    raw, _ = transport.call(b.endpoint, encode_request(a), 0)
    assert b"tokens" not in raw


def encode_request(node: Node) -> bytes:
    from p2prc_core.wire import ExchangeRequest
    return encode(ExchangeRequest(from_=node.node_id, digest="A" * DIGEST_CHARS))


def test_an_answer_from_this_version_always_says_tokens(tmp_path: Path) -> None:
    a, b, transport = pair(tmp_path, records(3))
    raw, _ = transport.call(b.endpoint, encode_request(a), 0)
    answer = json.loads(raw)
    assert "tokens" in answer and len(answer["tokens"]) % TOKEN_CHARS == 0
    assert ExchangeAnswer(records=[], cursor="c", tokens="").tokens == ""
    with pytest.raises(PeerRefused):
        from p2prc_core.asking import parse_answer
        parse_answer(json.dumps({"records": [], "cursor": "c", "tokens": 5}).encode(), 10, "x")


def test_peers_update_asks_the_fanout_or_everyone(tmp_path: Path) -> None:
    """`p2prc peers update` asks `update_fanout` peers of a larger table; `--fanout N`
    asks N, `--all` every one (here: peers at a closed port, so every ask fails fast)."""
    import os
    import socket
    import subprocess

    from conftest import P2PRC

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]  # bound, never listening: connections are refused
    home = tmp_path / "me"
    table = PeerTable(home, NodeIdentity.load_or_create(home).node_id, allow_loopback=True)
    table.merge([sign_record(NodeIdentity.generate(), {
        "name": f"p{i}", "addresses": ["127.0.0.1"], "port": port, "seq": 1,
        "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})
        for i in range(9)])
    env = {**os.environ, "P2PRC_HOME": str(home), "P2PRC_ALLOW_LOOPBACK": "true",
           "P2PRC_REQUEST_TIMEOUT": "2"}
    try:
        for extra, asked in (([], 4), (["--fanout", "2"], 2), (["--all"], 9)):
            table.update(lambda s: [setattr(e.measured, "failures", 0)
                                    for e in s.peers.values()])
            done = subprocess.run([P2PRC, "peers", "update", "--hops", "1", "--json", *extra],
                                  capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["asked"] == asked, extra
    finally:
        closed.close()


def test_records_longer_than_any_address_are_not_kept_by_the_address_cache(
        tmp_path: Path) -> None:
    """A hostile peer's records with address strings of 100 KB each: none is stored, and
    none is kept in memory by the cache of checked addresses."""
    from p2prc_core.peertable import _dialable

    table = PeerTable(tmp_path, "me")
    before = _dialable.cache_info().currsize
    junk = [{"node_id": f"n{i}", "seq": 1, "addresses": [f"{i}" + "1" * 100_000]}
            for i in range(50)]
    result = table.merge(junk)
    assert result.dropped["no-address"] == 50 and table.load() == {}
    assert _dialable.cache_info().currsize == before


def test_a_full_table_does_not_fetch_what_it_has_no_room_for_again_and_again(
        tmp_path: Path) -> None:
    """A node whose table holds at most 150 peers asks one that holds 400: the first
    exchange fills it; the next ones cost a few hundred bytes, not the records again."""
    transport = InProcessTransport()
    small, big = Node(tmp_path, 0, transport), Node(tmp_path, 1, transport)
    small.table.max_peers = small.table.max_unverified = 150
    big.table.merge(records(400))
    small.table.merge([big.own])
    first = exchange(small, big)
    assert len(small.table.load()) == 150 and first.bytes_received > 149 * 400
    for _ in range(3):
        again = exchange(small, big)
        assert again.added == [] and again.bytes_received < 200, again.bytes_received
    assert len(small.table.snapshot().gone) == 251


def test_after_this_nodes_own_outage_one_peer_brings_the_others_back(tmp_path: Path) -> None:
    """This node's network is down for `peer_max_failures` updates: every peer fails and is
    removed. Back online, with one peer added again, the next update brings back the rest
    (they were not counted as gone: no peer at all answered, so the fault was ours)."""
    transport = InProcessTransport()
    me = Node(tmp_path, 0, transport)
    others = [Node(tmp_path, i, transport) for i in range(1, 6)]
    for node in [me, *others]:
        node.table.merge([n.own for n in [me, *others] if n is not node])
    transport.down.update(Endpoint(n.address, 8088) for n in others)
    for _ in range(3):
        me.discovery.update(hops=1)
    assert me.table.load() == {} and me.table.snapshot().gone == {}
    transport.down.clear()
    me.table.merge([others[0].own])
    me.discovery.update(hops=3)
    assert set(me.table.load()) == {n.node_id for n in others}


def test_a_peer_that_sends_fewer_records_a_page_than_asked_still_sends_all(
        tmp_path: Path) -> None:
    """A peer whose own limit is 100 records an answer, asked by a node that asks for 500 a
    page: everything comes in one exchange."""
    transport = InProcessTransport()
    transport.max_records = 100
    a, b = Node(tmp_path, 0, transport), Node(tmp_path, 1, transport)
    b.table.merge(records(600))
    a.table.merge([b.own])
    assert len(exchange(a, b).added) == 600
