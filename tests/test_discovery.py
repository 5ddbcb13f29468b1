"""Discovery logic with the in-process transport (the same exchange code, no sockets), and
the hostile and crash cases of the table. Real hosts are in test_netns.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import BUILTINS
from p2prc_core.discovery import Discovery, ExchangeError, InProcessTransport, handle_exchange
from p2prc_core.gossip import DIGEST_CHARS
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.peertable import PeerEntry, PeerTable, TableState
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.records import RecordPublisher, sign_record

HOOKS = make_plugin_manager(load_entrypoints=False, plugins=BUILTINS)


class SimNode:
    def __init__(self, root: Path, index: int, transport: InProcessTransport,
                 addresses: list[str] | None = None, max_failures: int = 3):
        self.home = root / f"node{index}"
        self.identity = NodeIdentity.load_or_create(self.home)
        self.addresses = addresses or [f"2001:db8::{index + 1:x}"]
        self.endpoint = Endpoint(self.addresses[0], 8088)
        self.publisher = RecordPublisher(self.home, self.identity)
        self.table = PeerTable(self.home, self.identity.node_id)
        self.discovery = Discovery(self.table, HOOKS, transport, self.record,
                                   max_failures=max_failures)
        transport.serve(self.endpoint, self.table, self.record)

    def record(self) -> dict[str, Any]:
        return self.publisher.current({"name": f"n{self.home.name}", "addresses": self.addresses,
                                       "port": 8088, "specs": {}, "metadata": {},
                                       "version": "test"})

    def knows(self) -> set[str]:
        return set(self.table.load())


@pytest.fixture
def transport() -> InProcessTransport:
    return InProcessTransport()


def chain(tmp_path: Path, transport: InProcessTransport, count: int) -> list[SimNode]:
    nodes = [SimNode(tmp_path, i, transport) for i in range(count)]
    for left, right in zip(nodes, nodes[1:], strict=False):
        left.table.merge([right.record()])
    return nodes


def test_chain_is_found_whole_with_enough_hops_only(tmp_path: Path,
                                                    transport: InProcessTransport) -> None:
    nodes = chain(tmp_path, transport, 5)
    others = {n.identity.node_id for n in nodes[1:]}
    nodes[0].discovery.update(hops=1)
    assert nodes[0].knows() == {nodes[1].identity.node_id, nodes[2].identity.node_id}
    summary = nodes[0].discovery.update(hops=4)
    assert nodes[0].knows() == others
    assert summary.hops == 3  # the last peer learned of was asked; nothing new after that
    # Every peer asked learned of node 0: each exchange hands over our record.
    assert nodes[0].identity.node_id in nodes[3].knows()


def test_nothing_changed_costs_almost_nothing(tmp_path: Path,
                                              transport: InProcessTransport) -> None:
    nodes = chain(tmp_path, transport, 3)
    hub = nodes[1]
    for i in range(3, 30):  # the middle node knows many peers
        hub.table.merge([SimNode(tmp_path, i, transport).record()])
    first = nodes[0].discovery.update(hops=1)
    assert first.bytes_received > 25 * 300
    nodes[0].discovery.update(hops=1)  # the first contact with each of the peers learned of
    second = nodes[0].discovery.update(hops=1)
    assert second.asked == 29 and second.added == [] and second.updated == []
    # Per peer asked: no records either way, only a cursor and a few numbers.
    assert second.bytes_received / second.asked < 120, "an unchanged table was sent again"
    # We send a digest of what we know (a fixed size: test_gossip shows it does not grow
    # with the table), a cursor and a few numbers, not our record.
    assert second.bytes_sent / second.asked < 200 + DIGEST_CHARS, \
        "our unchanged record was sent again"


def test_records_the_asker_holds_are_left_out(tmp_path: Path,
                                              transport: InProcessTransport) -> None:
    nodes = chain(tmp_path, transport, 2)
    shared = [SimNode(tmp_path, i, transport).record() for i in range(2, 22)]
    nodes[0].table.merge(shared)
    nodes[1].table.merge(shared)
    summary = nodes[0].discovery.update(hops=1, only=[nodes[1].identity.node_id])
    assert summary.added == [] and summary.failed == {}
    assert summary.bytes_received < 300, "records we hold were sent to us"


def test_large_tables_come_in_pages(tmp_path: Path, transport: InProcessTransport) -> None:
    nodes = chain(tmp_path, transport, 2)
    for i in range(2, 40):
        nodes[1].table.merge([SimNode(tmp_path, i, transport).record()])
    transport.max_records = 7
    nodes[0].discovery.max_records = 7
    summary = nodes[0].discovery.update(hops=1)
    assert len(nodes[0].knows()) == 39
    assert len(summary.added) == 38


def test_a_changed_record_is_updated_by_seq(tmp_path: Path,
                                            transport: InProcessTransport) -> None:
    nodes = chain(tmp_path, transport, 2)
    nodes[0].discovery.update(hops=1)
    nodes[1].addresses.append("2001:db8::99")  # node 1 moves: its seq grows
    summary = nodes[0].discovery.update(hops=1)
    assert summary.updated == [nodes[1].identity.node_id]
    held = nodes[0].table.load()[nodes[1].identity.node_id].record
    assert "2001:db8::99" in held["addresses"] and held["seq"] == 2


def test_a_dead_peer_is_removed_after_the_configured_failures(
        tmp_path: Path, transport: InProcessTransport) -> None:
    nodes = [SimNode(tmp_path, i, transport, max_failures=2) for i in range(2)]
    nodes[0].table.merge([nodes[1].record()])
    transport.down.add(nodes[1].endpoint)
    first = nodes[0].discovery.update(hops=1)
    assert first.removed == [] and nodes[1].identity.node_id in first.failed
    assert nodes[0].table.load()[nodes[1].identity.node_id].measured.failures == 1
    second = nodes[0].discovery.update(hops=1)
    assert second.removed == [nodes[1].identity.node_id]
    assert nodes[0].knows() == set()


def test_a_peer_that_answers_again_is_forgiven(tmp_path: Path,
                                               transport: InProcessTransport) -> None:
    nodes = [SimNode(tmp_path, i, transport, max_failures=2) for i in range(2)]
    nodes[0].table.merge([nodes[1].record()])
    transport.down.add(nodes[1].endpoint)
    nodes[0].discovery.update(hops=1)
    transport.down.clear()
    nodes[0].discovery.update(hops=1)
    transport.down.add(nodes[1].endpoint)
    assert nodes[0].discovery.update(hops=1).removed == []  # failures in a row only


def test_dialling_falls_back_to_ipv4(tmp_path: Path, transport: InProcessTransport) -> None:
    dual = SimNode(tmp_path, 1, transport, addresses=["2001:db8::1", "198.51.100.1"])
    transport.serve(Endpoint("198.51.100.1", 8088), dual.table, dual.record)
    me = SimNode(tmp_path, 0, transport, addresses=["2001:db8::a"])
    me.table.merge([dual.record()])
    me.discovery.update(hops=1)
    assert me.table.load()[dual.identity.node_id].measured.address == "[2001:db8::1]:8088"
    transport.down.add(dual.endpoint)  # IPv6 breaks
    me.discovery.update(hops=1)
    measured = me.table.load()[dual.identity.node_id].measured
    assert measured.address == "198.51.100.1:8088" and measured.failures == 0


# -- hostile tables ---------------------------------------------------------------------------

HOSTILE = ["127.0.0.1", "::1", "fe80::1", "169.254.169.254", "::ffff:127.0.0.1", "0.0.0.0",
           "::", "ff02::1", "224.0.0.1", "::ffff:169.254.169.254",
           # cloud metadata elsewhere, 0/8, broadcast, and IPv6 spellings of forbidden IPv4
           "fd00:ec2::254", "100.100.100.200", "0.1.2.3", "255.255.255.255",
           "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "2002:7f00:1::", "2002:a9fe:a9fe::1",
           "::127.0.0.1", "::169.254.169.254", "64:ff9b:1::a9fe:a9fe", "::ffff:0:7f00:1"]


def test_records_that_only_offer_forbidden_addresses_are_not_added(
        tmp_path: Path, transport: InProcessTransport) -> None:
    nodes = chain(tmp_path, transport, 2)
    liars = []

    def plant(state: Any, record: dict[str, Any]) -> None:
        """Put a record straight into the hostile peer's table, past its own checks."""
        state.clock += 1
        state.peers[record["node_id"]] = PeerEntry(record, state.clock)

    for i, bad in enumerate(HOSTILE):
        liar = NodeIdentity.generate()
        liars.append(liar.node_id)
        record = sign_record(liar, {"name": f"liar{i}", "addresses": [bad], "port": 8088,
                                    "seq": 1, "time": int(time.time()), "specs": {},
                                    "metadata": {}, "version": "x"})
        nodes[1].table.update(lambda state, record=record: plant(state, record))
    mixed = NodeIdentity.generate()
    nodes[1].table.merge([sign_record(mixed, {
        "name": "mixed", "addresses": ["::1", "fe80::2", "2001:db8::77"], "port": 8088,
        "seq": 1, "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})])
    summary = nodes[0].discovery.update(hops=1)
    held = nodes[0].table.load()
    assert not set(liars) & set(held)
    assert summary.dropped["no-address"] == len(HOSTILE)
    # The mixed record is kept (it is signed as it is), but only its good address is dialled.
    endpoints = nodes[0].discovery.endpoints(held[mixed.node_id])
    assert [str(e) for e in endpoints] == ["[2001:db8::77]:8088"]


def test_a_full_table_keeps_peers_that_answered_and_turns_over_the_others(
        tmp_path: Path) -> None:
    table = PeerTable(tmp_path, max_peers=4, max_unverified=2)

    def record(identity: NodeIdentity, seq: int = 1) -> dict[str, Any]:
        return sign_record(identity, {"name": "p", "addresses": ["2001:db8::9"], "port": 1,
                                      "seq": seq, "time": int(time.time()), "specs": {},
                                      "metadata": {}, "version": "x"})

    known = [NodeIdentity.generate() for _ in range(2)]
    assert len(table.merge([record(k) for k in known]).added) == 2

    def answered(state: TableState) -> None:
        for identity in known:
            state.peers[identity.node_id].measured.last_seen = time.time()

    table.update(answered)
    first = [record(NodeIdentity.generate()) for _ in range(50)]
    result = table.merge(first)
    assert len(result.added) == 2 and result.dropped["table-full"] == 48
    second = [record(NodeIdentity.generate()) for _ in range(3)]
    result = table.merge(second)
    # The newest strangers push out older strangers, never the peers that answered.
    assert len(result.added) == 2 and result.dropped["table-full"] == 1
    held = set(table.load())
    assert {k.node_id for k in known} <= held and len(held) == 4
    assert not held & {r["node_id"] for r in first}
    assert table.merge([record(known[0], seq=2)]).updated == [known[0].node_id]


def test_one_source_adds_only_what_it_is_admitted(tmp_path: Path) -> None:
    table = PeerTable(tmp_path)
    flood = [make_record(NodeIdentity.generate(), f"junk{i}") for i in range(30)]
    result = table.update(lambda state: table.merge_into(state, flood, admit=lambda n: 5))
    assert len(result.added) == 5 and result.dropped["rate-limited"] == 25


def test_loopback_is_allowed_when_the_config_says_so(tmp_path: Path) -> None:
    table = PeerTable(tmp_path, allow_loopback=True)
    record = sign_record(NodeIdentity.generate(), {
        "name": "lab", "addresses": ["127.0.0.1", "fe80::1"], "port": 1, "seq": 1,
        "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})
    assert table.merge([record]).added == [record["node_id"]]
    assert [str(a) for a in table.dial_addresses(record)] == ["127.0.0.1"]


class Liar(InProcessTransport):
    """Answers with whatever a test gives it."""

    def __init__(self, answer: bytes):
        super().__init__()
        self.answer = answer

    def call(self, endpoint: Endpoint, body: bytes, probes: int,
             timeout: float | None = None) -> tuple[bytes, float | None]:
        return self.answer, 1.0


class Unprobed(InProcessTransport):
    """Answers, but while ``probing`` is off (a peer that used up its time on the exchange)
    with no latency."""

    probing = False

    def call(self, endpoint: Endpoint, body: bytes, probes: int,
             timeout: float | None = None) -> tuple[bytes, float | None]:
        return super().call(endpoint, body, probes if self.probing else 0, timeout)


def test_a_peer_whose_latency_went_unmeasured_is_not_ranked_as_the_fastest(
        tmp_path: Path) -> None:
    """A peer that drips its answer leaves no time for latency probes: its latency stays
    what it was (unknown at first, which ranks last), never 0 ms, which would rank first."""
    transport = Unprobed()
    me, slow = SimNode(tmp_path, 0, transport), SimNode(tmp_path, 1, transport)
    me.table.merge([slow.record()])
    me.discovery.update(hops=1)
    assert me.table.load()[slow.identity.node_id].measured.latency_ms is None
    transport.latency_ms[slow.endpoint] = 42.0
    transport.probing = True
    me.discovery.update(hops=1)
    assert me.table.load()[slow.identity.node_id].measured.latency_ms == 42.0
    transport.probing = False
    me.discovery.update(hops=1)  # not probed again: the last figure stands
    assert me.table.load()[slow.identity.node_id].measured.latency_ms == 42.0


@pytest.mark.parametrize("answer", [
    b"not json", b"[]", b'{"records": "x", "cursor": "c"}', b'{"records": []}',
    json.dumps({"records": [{}] * 501, "cursor": "c"}).encode(),
    json.dumps({"records": [None, 1, "x", {"node_id": 5}], "cursor": "c"}).encode(),
    json.dumps({"records": [], "cursor": "c" * 65}).encode(),
    b'{"records": [], "cursor": "c", "node": "me"}',
])
def test_garbage_answers_count_as_failures_and_crash_nothing(tmp_path: Path,
                                                             answer: bytes) -> None:
    transport = Liar(answer)
    me = SimNode(tmp_path, 0, transport)
    peer = SimNode(tmp_path, 1, InProcessTransport())
    me.table.merge([peer.record()])
    summary = me.discovery.update(hops=1)
    held = me.table.load()
    assert set(held) == {peer.identity.node_id}
    failed = summary.failed or summary.dropped
    assert failed, f"{answer[:40]!r} was accepted"


def test_an_answer_claiming_to_be_another_node_is_dropped(tmp_path: Path) -> None:
    impostor = NodeIdentity.generate()
    fake = sign_record(impostor, {"name": "x", "addresses": ["2001:db8::5"], "port": 8088,
                                  "seq": 1, "time": int(time.time()), "specs": {},
                                  "metadata": {}, "version": "x"})
    me = SimNode(tmp_path, 0, Liar(json.dumps({"records": [], "cursor": "e:1",
                                               "node": fake}).encode()))
    peer = SimNode(tmp_path, 1, InProcessTransport())
    me.table.merge([peer.record()])
    summary = me.discovery.update(hops=1)
    assert summary.dropped["impostor"] == 1 and impostor.node_id not in me.knows()


@pytest.mark.parametrize("body, words", [
    ([], "JSON object"), ({"records": "x"}, "records"), ({"records": [{}] * 501}, "at most"),
    ({"since": 5}, "cursor"), ({"limit": 0}, "positive"), ({"limit": True}, "positive"),
    ({"have": "abc"}, "record tokens"), ({"have": 5}, "record tokens"),
    ({"have": "a" * 8 * 5000}, "at most 4096"),
])
def test_malformed_exchanges_are_refused(tmp_path: Path, body: Any, words: str) -> None:
    me = SimNode(tmp_path, 0, InProcessTransport())
    with pytest.raises(ExchangeError, match=words):
        handle_exchange(me.table, me.record(), body, 500)


def test_a_three_hop_update_on_a_chain_of_five_reads_and_writes_once_per_hop(
        tmp_path: Path, transport: InProcessTransport,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from p2prc_core import storage

    nodes = chain(tmp_path, transport, 5)
    mine = nodes[0].table.path
    reads, writes = [], []
    real_read, real_write = storage.read_json_file, storage.atomic_write_json

    def counted_read(path: Path, default: Any) -> Any:
        if path == mine:
            reads.append(path)
        return real_read(path, default)

    def counted_write(path: Path, data: Any, mode: int = 0o600) -> None:
        if path == mine:
            writes.append(path)
        real_write(path, data, mode)

    monkeypatch.setattr(storage, "read_json_file", counted_read)
    monkeypatch.setattr(storage, "atomic_write_json", counted_write)
    summary = nodes[0].discovery.update(hops=3)
    # One read to start, then one locked read and one write per hop (pruning included).
    assert (len(reads), len(writes)) == (4, 3)
    assert summary.hops == 3 and nodes[0].knows() == {n.identity.node_id for n in nodes[1:]}


# -- nothing lost --------------------------------------------------------------------------------

def make_record(identity: NodeIdentity, name: str,
                address: str = "2001:db8::99") -> dict[str, Any]:
    return sign_record(identity, {"name": name, "addresses": [address], "port": 8088, "seq": 1,
                                  "time": int(time.time()), "specs": {}, "metadata": {},
                                  "version": "x"})


def _merge_many(home: str, seed: int, count: int) -> None:
    table = PeerTable(Path(home))
    for i in range(count):
        table.merge([sign_record(NodeIdentity.generate(), {
            "name": f"p{seed}-{i}", "addresses": [f"2001:db8::{seed}:{i}"], "port": 8088,
            "seq": 1, "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})])


def test_two_updates_at_once_lose_nothing(tmp_path: Path) -> None:
    """The second writer starts its update while the first is inside its own: without the
    lock it would read the table before the first writes, and lose the first's record."""
    table = PeerTable(tmp_path)
    first_inside, second_read = threading.Event(), threading.Event()
    first, second = make_record(NodeIdentity.generate(), "first"), \
        make_record(NodeIdentity.generate(), "second")

    lock_inode = None

    def second_is_waiting() -> bool:
        """The kernel lists a blocked request (``->``) for the table's lock file."""
        with open("/proc/locks") as locks:
            return any("->" in line and f":{lock_inode} " in line for line in locks)

    def slow_merge(state: TableState) -> None:
        nonlocal lock_inode
        lock_inode = os.stat(str(table.path) + ".lock").st_ino
        first_inside.set()
        # Without the lock the second writer reads now; with it, it waits for our write.
        deadline = time.monotonic() + 30
        while not (second_read.is_set() or second_is_waiting()):
            assert time.monotonic() < deadline, "the second writer never started"
            time.sleep(0.005)
        table.merge_into(state, [first])

    def quick_merge(state: TableState) -> None:
        second_read.set()
        table.merge_into(state, [second])

    writer = threading.Thread(target=table.update, args=(slow_merge,))
    writer.start()
    assert first_inside.wait(timeout=30)
    table.update(quick_merge)  # starts while the first update holds the table
    writer.join(30)
    assert {e.name for e in table.load().values()} == {"first", "second"}


def test_many_updates_from_two_processes_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), seed, 15)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = {e.name for e in PeerTable(tmp_path).load().values()}
    assert len(names) == 30


WRITER = """
import sys, time
from pathlib import Path
from p2prc_core.storage import atomic_write_json
path = Path(sys.argv[1])
big = {"peers": {str(i): {"record": {"name": "x" * 200}} for i in range(3000)}}
n = 0
while True:
    n += 1
    big["n"] = n
    atomic_write_json(path, big)
"""


def test_a_writer_killed_mid_write_leaves_a_valid_table(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    for writes in (2, 5, 9):  # killed at different points of its writing
        path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if path.exists() and json.loads(path.read_text())["n"] >= writes:
                    break  # every read of the file is whole, even while it is rewritten
                time.sleep(0.01)
            else:
                pytest.fail(f"the writer did not write {writes} times")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        data = json.loads(path.read_text())  # never half-written
        assert len(data["peers"]) == 3000 and data["n"] >= writes
    assert PeerTable(tmp_path).load()  # and the table reads it


def test_a_corrupt_table_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "peers.json").write_text('{"peers": ')
    with pytest.raises(ValueError, match="peers.json is not valid JSON"):
        PeerTable(tmp_path).load()


def test_a_record_that_points_at_this_node_itself_is_never_dialled(
        tmp_path: Path, transport: InProcessTransport) -> None:
    me, friend = chain(tmp_path, transport, 2)
    mirror = make_record(NodeIdentity.generate(), "mirror", me.addresses[0])  # our address
    friend.table.merge([mirror])
    summary = me.discovery.update(hops=2)
    assert summary.failed[mirror["node_id"]] == "no address this node may dial"
    assert transport.bytes_served[me.endpoint] == 0  # we were never asked by ourselves


@pytest.mark.parametrize("observed, kept", [
    ("203.0.113.9", "203.0.113.9"), ("::ffff:198.51.100.4", "198.51.100.4"),
    ("[bold]x[/]", None), ("2001:db8::1" * 10, None), (17, None), (None, None)])
def test_a_peers_word_for_our_address_is_an_ip_address_or_nothing(observed: Any,
                                                                  kept: str | None) -> None:
    from p2prc_core.asking import parse_answer

    raw = json.dumps({"records": [], "cursor": "c", "observed": observed}).encode()
    assert parse_answer(raw, 10, "peer").observed == kept


def test_records_of_odd_shapes_are_dropped_and_the_rest_merged(tmp_path: Path) -> None:
    table = PeerTable(tmp_path)
    good = make_record(NodeIdentity.generate(), "good")
    odd = [{"node_id": [], "addresses": ["2001:db8::2"]}, {"node_id": {"a": 1}}, 7, None]
    result = table.merge([good, *odd])
    assert result.added == [good["node_id"]] and result.dropped["malformed"] == 4


def test_forgeries_push_out_nobody(tmp_path: Path) -> None:
    table = PeerTable(tmp_path, max_unverified=5)
    genuine = [make_record(NodeIdentity.generate(), f"real{i}") for i in range(5)]
    table.merge(genuine)
    # Copied signatures on new ids: they fail verification, so they take no one's place.
    forged = [{**genuine[0], "node_id": NodeIdentity.generate().node_id} for _ in range(20)]
    result = table.merge(forged)
    assert result.added == [] and set(table.load()) == {r["node_id"] for r in genuine}


def test_newcomers_held_back_by_the_limit_come_on_later_updates(
        tmp_path: Path, transport: InProcessTransport) -> None:
    me, friend = chain(tmp_path, transport, 2)
    friend.table.merge([make_record(NodeIdentity.generate(), f"p{i}", f"2001:db8::1:{i:x}")
                        for i in range(30)])
    limited = Discovery(me.table, HOOKS, transport, me.record, newcomers_per_peer=10,
                        max_failures=100)  # the learned ones are made up: they never answer
    sizes = []
    for _ in range(4):
        limited.update(hops=1)
        sizes.append(len(me.table.load()))
    assert sizes == [11, 21, 31, 31]  # the friend, then 10 more each time, until all are in
