"""A long table's rows kept in the home (``peers-view.json``, ``PeerListing``): a listing
that finds them made for the same table, plugins and own server reads them and asks no
plugin; after a change of the table only the changed peers' rows are made again, and after
a change of plugins or server all of them; trust names and punched paths are applied at
each listing; a damaged or hostile view is never shown, only made again; and a view that
cannot be written costs only time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import BUILTINS
from p2prc_core import hookimpl, peer_listing
from p2prc_core.config import Settings
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.peer_listing import VIEW_FILE, PeerRow
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.records import sign_record
from p2prc_core.services import NodeServices
from p2prc_core.storage import atomic_write_json

RELAY = NodeIdentity.generate()


def record(identity: NodeIdentity, i: int, **fields: Any) -> dict[str, Any]:
    return sign_record(identity, {
        "name": f"peer{i}",
        "addresses": [f"2001:db8:{i + 1:x}::1", f"198.51.{i // 250}.{i % 250 + 1}"],
        "port": 8088, "seq": fields.pop("seq", 1), "time": int(time.time()),
        "specs": {"cpus": 8, "memory": 16 << 30, "gpus": ["H200"] if i % 3 == 0 else []},
        "metadata": {}, "version": "0.1.0", **fields})


class Counted:
    """A scoring plugin that counts its calls: how a test sees whether rows were made."""

    calls = 0

    @staticmethod
    @hookimpl
    def p2prc_score_peer(peer: Any) -> float:
        Counted.calls += 1
        return 0.0


def node(home: Path, extra: list[Any] | None = None) -> NodeServices:
    hooks = make_plugin_manager(load_entrypoints=False,
                                plugins=[*BUILTINS, *((p.__name__, p) for p in extra or [Counted])])
    services = NodeServices(Settings(), home, hooks)
    services.peers.listing.keep_from = 5
    return services


@pytest.fixture
def table(tmp_path: Path) -> tuple[Path, list[NodeIdentity]]:
    """A home whose table holds 12 peers, one reached only through a relay."""
    home = tmp_path / "home"
    ids = [NodeIdentity.generate() for _ in range(12)]
    records = [record(p, i) for i, p in enumerate(ids[:-1])]
    records.append(sign_record(ids[-1], {
        "name": "behind", "addresses": [], "port": 8088, "seq": 1, "time": int(time.time()),
        "specs": {}, "metadata": {}, "version": "0.1.0",
        "relays": [f"{RELAY.node_id}@198.51.7.7:8088"]}))
    table = node(home).table  # (a node behind a relay may list no address of its own)
    table.update(lambda state: table.merge_into(state, records, check_addresses=False))
    return home, ids


def fresh(home: Path) -> list[PeerRow]:
    """The rows made now, with no view: what a kept view must equal."""
    (home / VIEW_FILE).unlink(missing_ok=True)
    services = node(home)
    services.peers.listing.keep_from = 10 ** 9
    return services.peers.rows()


def test_a_long_tables_rows_are_kept_and_read_back_without_asking_a_plugin(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    home, _ = table
    made = node(home).peers.rows()
    assert (home / VIEW_FILE).exists()
    assert oct((home / VIEW_FILE).stat().st_mode & 0o777) == "0o600"
    Counted.calls = 0
    kept = node(home).peers.rows()
    assert Counted.calls == 0  # read, not made
    assert kept == made == fresh(home)
    assert len(kept) == 12
    assert [r.gpus_free for r in node(home).peers.rows(with_gpu=True)] == \
        [r.gpus_free for r in made if r.gpus_free > 0]


def test_a_table_grown_short_again_keeps_no_view(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    home, ids = table
    services = node(home)
    services.peers.listing.keep_from = 12  # the table holds 12: long enough, just
    services.peers.rows()
    assert (home / VIEW_FILE).exists()
    services.table.update(lambda state: state.peers.pop(ids[0].node_id))
    assert len(services.peers.rows()) == 11
    assert not (home / VIEW_FILE).exists()


def test_a_changed_table_makes_only_the_changed_rows_again_and_trust_needs_none(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    home, ids = table
    node(home).peers.rows()

    newcomer = NodeIdentity.generate()
    node(home).table.merge([record(newcomer, 40)])
    Counted.calls = 0
    rows = node(home).peers.rows()
    assert Counted.calls == 1 and newcomer.node_id in {r.node_id for r in rows}  # it alone
    assert rows == fresh(home)

    node(home).peers.rows()
    node(home).table.update(lambda state: setattr(
        state.peers[ids[4].node_id].measured, "latency_ms", 3.0))  # answered: now the best
    Counted.calls = 0
    rows = node(home).peers.rows()
    assert Counted.calls == 1
    assert rows == fresh(home) and rows[0].node_id == ids[4].node_id

    node(home).peers.rows()
    node(home).trust.add(ids[0].node_id, "alice")
    Counted.calls = 0
    rows = node(home).peers.rows()
    assert Counted.calls == 0  # the trust list is applied at each listing
    assert {r.node_id: r.trusted for r in rows}[ids[0].node_id] == "alice"
    assert rows == fresh(home)


def test_another_plugin_set_makes_every_row_again(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    home, _ = table

    class Another:  # another plugin installed: its say may change every score
        @staticmethod
        @hookimpl
        def p2prc_score_peer(peer: Any) -> float:
            return 1000.0 if peer.name == "peer7" else 0.0

    node(home).peers.rows()
    Counted.calls = 0
    rows = node(home, extra=[Counted, Another]).peers.rows()
    assert Counted.calls == 12
    assert rows[0].name == "peer7"


def test_a_punched_path_is_applied_at_each_listing_not_kept(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    home, ids = table
    behind = ids[-1].node_id
    node(home).peers.rows()
    assert {r.node_id: r.path for r in node(home).peers.rows()}[behind] == "relay"
    atomic_write_json(home / "punched.json",
                      {behind: {"path": "punched", "why": "", "at": time.time()}})
    Counted.calls = 0
    assert {r.node_id: r.path for r in node(home).peers.rows()}[behind] == "punched"
    assert Counted.calls == 0  # the view stood: only the path was applied
    atomic_write_json(home / "punched.json",
                      {behind: {"path": "punched", "why": "", "at": time.time() - 3600.0}})
    assert {r.node_id: r.path for r in node(home).peers.rows()}[behind] == "relay"


def test_a_peer_reached_at_its_routers_mapping_is_shown_as_mapped_and_a_lie_as_direct(
        tmp_path: Path) -> None:
    """The record's ``metadata.mapped`` (the peer's word, ``own_node.record_fields``) names
    the address its router maps for it: reached there, the path is ``mapped``; reached
    elsewhere, ``direct``; a value that is no IP address is as if absent, and never
    crashes a listing, kept or made."""
    home = tmp_path / "home"
    says = ["198.51.0.1", "2001:db8:2::1", "203.0.113.9", 5, "x" * 1000, "198.51.2.1\n",
            "::ffff:198.51.3.1%eth0", "", None]
    ids = [NodeIdentity.generate() for _ in says]
    records = [record(p, i, metadata={} if said is None else {"mapped": said})
               for i, (p, said) in enumerate(zip(ids, says, strict=True))]
    reached = ["198.51.0.1:8088", "[2001:db8:2::1]:8088", "198.51.2.1:8088",
               "198.51.3.1:8088", "198.51.4.1:8088", "198.51.5.1:8088", "198.51.6.1:8088",
               "198.51.7.1:8088", "198.51.8.1:8088"]
    services = node(home)
    table = services.table

    def measure(state: Any) -> None:
        table.merge_into(state, records, check_addresses=False)
        for identity, address in zip(ids, reached, strict=True):
            state.peers[identity.node_id].measured.address = address

    table.update(measure)
    made = {r.node_id: r.path for r in node(home).peers.rows()}
    kept = {r.node_id: r.path for r in node(home).peers.rows()}
    assert made == kept
    assert [made[i.node_id] for i in ids] == ["mapped", "mapped"] + ["direct"] * 7
    assert (home / VIEW_FILE).exists()


def test_a_nodes_record_says_which_address_is_its_routers_mapping() -> None:
    from p2prc_core.own_node import record_fields

    hooks = make_plugin_manager(load_entrypoints=False, plugins=list(BUILTINS))
    upnp = {"upnp": {"external_ip": "203.0.113.9", "external_port": 8088}}
    fields = record_fields(Settings(), hooks, {}, "0.1.0", upnp)
    assert fields["addresses"][0] == "203.0.113.9"
    assert fields["metadata"] == {"mapped": "203.0.113.9"}
    assert record_fields(Settings(), hooks, {}, "0.1.0", {})["metadata"] == {}
    chosen = Settings(advertise_addresses=["192.0.2.4"])  # the user's own list: as it is
    assert record_fields(chosen, hooks, {}, "0.1.0", upnp)["metadata"] == {}


def _damaged(view: dict[str, Any]) -> list[tuple[str, Any]]:
    row = view["rows"][0]
    fields = view["fields"]

    def changed(name: str, value: Any) -> dict[str, Any]:
        rows = [list(r) for r in view["rows"]]
        rows[0][fields.index(name)] = value
        return {**view, "rows": rows}

    return [
        ("truncated", json.dumps(view)[:500]),
        ("not an object", [view]),
        ("no rows", {**view, "rows": None}),
        ("another context", {**view, "context": "0" * 64}),
        ("another table", {**view, "table": [1, 2, 3]}),
        ("a table of two", {**view, "table": [1, 2]}),
        ("marks of numbers", {**view, "marks": list(range(len(view["marks"])))}),
        ("a score NaN", {**view, "scores": [float("nan"), *view["scores"][1:]]}),
        ("last seen infinite", changed("last_seen", float("inf"))),
        ("latency a whole number", changed("latency_ms", 5)),
        ("a score missing", {**view, "scores": view["scores"][1:]}),
        ("a score true", {**view, "scores": [True, *view["scores"][1:]]}),
        ("other fields", {**view, "fields": [*fields[:-1], "extra"]}),
        ("a row too long", {**view, "rows": [[*row, 1], *view["rows"][1:]]}),
        ("a row that is a string", {**view, "rows": ["x", *view["rows"][1:]]}),
        ("failures true", changed("failures", True)),
        ("score text", changed("score", "99")),
        ("name a number", changed("name", 7)),
        ("gpus not texts", changed("gpus", [1, 2])),
        ("can_host 1", changed("can_host", 1)),
        ("can_host 1.0", changed("can_host", 1.0)),
        ("latency nan text", changed("latency_ms", "NaN")),
        ("memory negative float", changed("memory", -1.5)),
        ("relays a string", changed("relays", "abc")),
        ("nested past the parser's depth", "[" * 100_000),
        ("a FIFO", None),
    ]


def test_a_damaged_or_hostile_view_is_never_shown_only_made_again(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    home, _ = table
    node(home).peers.rows()
    view = json.loads((home / VIEW_FILE).read_text())
    expected = fresh(home)
    for what, data in _damaged(view):
        (home / VIEW_FILE).unlink(missing_ok=True)
        if data is None:
            os.mkfifo(home / VIEW_FILE, 0o600)  # would hold a reader that opened it
        else:
            (home / VIEW_FILE).write_text(data if isinstance(data, str) else json.dumps(data))
        Counted.calls = 0
        assert node(home).peers.rows() == expected, what
        # (the rows of a view of another table are taken by their entries' marks)
        assert Counted.calls > 0 or what == "another table", what
        again = json.loads((home / VIEW_FILE).read_text())
        assert (again["context"], again["table"]) == (view["context"], view["table"]), what


def test_a_table_rewritten_to_the_same_size_and_time_is_not_taken_for_the_last(
        table: tuple[Path, list[NodeIdentity]]) -> None:
    """A local name changed to one of the same length, the file stamped with the time it
    had (a coarse clock, or two writes within one tick): the view does not stand."""
    home, ids = table
    services = node(home)
    services.table.name(ids[1].node_id, "aaaaa")
    assert {r.node_id: r.name for r in services.peers.rows()}[ids[1].node_id] == "aaaaa"
    was = (home / "peers.json").stat()
    services.table.name(ids[1].node_id, "bbbbb")
    os.utime(home / "peers.json", ns=(was.st_atime_ns, was.st_mtime_ns))
    assert (home / "peers.json").stat().st_size == was.st_size
    assert {r.node_id: r.name for r in node(home).peers.rows()}[ids[1].node_id] == "bbbbb"


def test_a_view_that_cannot_be_written_costs_only_time(
        table: tuple[Path, list[NodeIdentity]], monkeypatch: pytest.MonkeyPatch) -> None:
    home, _ = table

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("p2prc_core.storage.atomic_write", full)
    assert node(home).peers.rows() == fresh(home)
    assert not (home / VIEW_FILE).exists()


def test_another_own_server_makes_the_rows_again(
        table: tuple[Path, list[NodeIdentity]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer waiting at this node's hub is dialled through it: the hub is part of the key."""
    home, _ = table
    services = node(home)
    services.peers.rows()
    monkeypatch.setattr(type(services.peers), "_own_hub",
                        lambda self: Endpoint("127.0.0.1", 9999, self.identity.node_id))
    Counted.calls = 0
    node(home).peers.rows()
    assert Counted.calls > 0


def test_peers_ls_on_a_long_table_prints_the_same_rows_from_the_view(tmp_path: Path) -> None:
    """Through the command line, with the real threshold: 1,000 peers listed twice, the
    second time from the view, the same table and the same JSON."""
    home = tmp_path / "home"
    ids = [NodeIdentity.generate() for _ in range(peer_listing.VIEW_FROM)]
    services = node(home)
    services.table.max_peers = services.table.max_unverified = 10 ** 6
    services.table.merge([record(p, i) for i, p in enumerate(ids)])
    env = {**os.environ, "P2PRC_HOME": str(home), "P2PRC_MAX_TABLE_PEERS": "100000",
           "P2PRC_MAX_UNVERIFIED_PEERS": "100000"}

    def ls(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "p2prc_core", "peers", "ls", *args],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = ls()
    assert (home / VIEW_FILE).exists()
    stamp = (home / VIEW_FILE).stat().st_mtime_ns
    assert ls() == first
    assert (home / VIEW_FILE).stat().st_mtime_ns == stamp  # read, not made and kept again
    assert json.loads(ls("--json")) == [r.as_dict() for r in fresh(home)]
    assert len(first.splitlines()) == peer_listing.VIEW_FROM + 1
    ls()
    assert (home / VIEW_FILE).stat().st_mtime_ns != stamp  # fresh() removed it: made again
