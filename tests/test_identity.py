"""Node keys and signed peer records."""

from __future__ import annotations

import copy
import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc_core.identity import NODE_ID_LENGTH, NodeIdentity, b64encode, canonical_json, is_node_id
from p2prc_core.peertable import PeerTable
from p2prc_core.records import (
    RecordError,
    RecordPublisher,
    merge_records,
    sign_record,
    verify_record,
)

ALICE = NodeIdentity.generate()
MALLORY = NodeIdentity.generate()


def fields(**changes: Any) -> dict[str, Any]:
    base = {"name": "alice", "addresses": ["2001:db8::1", "192.0.2.1"], "port": 8088,
            "seq": 1, "time": int(time.time()), "specs": {"cpus": 4, "gpus": []},
            "metadata": {"room": "attic"}, "version": "0.1.0"}
    return {**base, **changes}


def test_key_is_created_once_private_and_stable(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    key = tmp_path / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert NodeIdentity.load_or_create(tmp_path).node_id == first.node_id
    assert len(first.node_id) == NODE_ID_LENGTH and is_node_id(first.node_id)


def _load_id(home: str, queue: Any) -> None:
    queue.put(NodeIdentity.load_or_create(Path(home)).node_id)


def test_processes_racing_to_create_the_key_agree(tmp_path: Path) -> None:
    queue: Any = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_load_id,
                                                         args=(str(tmp_path), queue))
             for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    ids = {queue.get(timeout=5) for _ in procs}
    assert len(ids) == 1
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_unreadable_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("not a key")
    with pytest.raises(Exception, match="cannot read the node key"):
        NodeIdentity.load_or_create(tmp_path)


def test_signed_record_verifies() -> None:
    record = sign_record(ALICE, fields())
    assert verify_record(record) is record
    assert record["node_id"] == ALICE.node_id


@pytest.mark.parametrize("change, reason", [
    (lambda r: r.update(name="eve"), "bad-signature"),
    (lambda r: r["addresses"].append("203.0.113.9"), "bad-signature"),
    (lambda r: r.update(seq=r["seq"] + 1), "bad-signature"),
    (lambda r: r.update(public_key=b64encode(MALLORY.public_key)), "id-mismatch"),
    (lambda r: r.update(node_id=MALLORY.node_id), "id-mismatch"),
    (lambda r: r.pop("signature"), "malformed"),
    (lambda r: r.update(port="8088"), "malformed"),
    (lambda r: r.update(extra=1), "malformed"),
    (lambda r: r.update(addresses=["x"] * 17), "malformed"),
])
def test_tampered_records_are_rejected(change: Any, reason: str) -> None:
    record = copy.deepcopy(sign_record(ALICE, fields()))
    change(record)
    with pytest.raises(RecordError) as caught:
        verify_record(record)
    assert caught.value.reason == reason


def test_mallory_cannot_speak_for_alice() -> None:
    forged = sign_record(MALLORY, fields(name="alice"))
    forged["node_id"] = ALICE.node_id
    forged["public_key"] = b64encode(ALICE.public_key)
    with pytest.raises(RecordError) as caught:
        verify_record(forged)
    assert caught.value.reason == "bad-signature"


def test_record_from_the_future_is_rejected() -> None:
    with pytest.raises(RecordError, match="future"):
        verify_record(sign_record(ALICE, fields(time=int(time.time()) + 3600)))


def test_merge_drops_bad_mismatched_older_and_conflicting_records() -> None:
    held: dict[str, dict[str, Any]] = {}
    v2 = sign_record(ALICE, fields(seq=2))
    assert merge_records(held, [v2]).added == [ALICE.node_id]

    bad = dict(sign_record(MALLORY, fields(seq=1)), name="changed")
    mismatched = dict(sign_record(MALLORY, fields(seq=1)), node_id=ALICE.node_id)
    older = sign_record(ALICE, fields(seq=1, name="old alice"))
    conflict = sign_record(ALICE, fields(seq=2, name="other alice"))
    result = merge_records(held, [bad, mismatched, older, conflict, v2, "junk", None])
    assert result.added == [] and result.updated == [] and result.unchanged == 1
    assert result.dropped == {"bad-signature": 1, "id-mismatch": 1, "older": 1,
                              "conflict": 1, "malformed": 2}
    assert held[ALICE.node_id] == v2

    v3 = sign_record(ALICE, fields(seq=3, name="new alice"))
    assert merge_records(held, [v3]).updated == [ALICE.node_id]
    assert held[ALICE.node_id]["name"] == "new alice"


def test_merge_refuses_our_own_record() -> None:
    held: dict[str, dict[str, Any]] = {}
    result = merge_records(held, [sign_record(ALICE, fields())], self_id=ALICE.node_id)
    assert held == {} and result.dropped == {"self": 1}


def test_peer_table_merge_is_saved_and_drops_forgeries(tmp_path: Path) -> None:
    table = PeerTable(tmp_path)
    forged = dict(sign_record(MALLORY, fields()), name="x")
    result = table.merge([sign_record(ALICE, fields()), forged])
    assert result.added == [ALICE.node_id] and result.dropped == {"bad-signature": 1}
    assert list(PeerTable(tmp_path).load()) == [ALICE.node_id]


def test_publisher_bumps_seq_only_when_content_changes(tmp_path: Path) -> None:
    publisher = RecordPublisher(tmp_path, ALICE)
    content = {k: v for k, v in fields().items() if k not in ("seq", "time")}
    first = publisher.current(content)
    assert first["seq"] == 1 and publisher.current(content) == first
    moved = publisher.current({**content, "addresses": ["2001:db8::2"]})
    assert moved["seq"] == 2 and verify_record(moved)
    # A new publisher (a restarted server) carries on from the saved seq.
    assert RecordPublisher(tmp_path, ALICE).current({**content, "port": 9}) ["seq"] == 3


# -- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=10)

record_fields = st.fixed_dictionaries({
    "name": st.text(max_size=64),
    "addresses": st.lists(st.ip_addresses().map(str), max_size=16),
    "port": st.integers(1, 65535),
    "seq": st.integers(0, 2**40),
    "time": st.integers(0, int(time.time())),
    "specs": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    "version": st.text(max_size=10),
})


@settings(max_examples=150, deadline=None)
@given(record_fields)
def test_signing_then_verifying_always_holds(data: dict[str, Any]) -> None:
    assert verify_record(sign_record(ALICE, data))


@settings(max_examples=300, deadline=None)
@given(record_fields, st.data())
def test_any_changed_byte_of_a_record_is_rejected(data: dict[str, Any],
                                                  draw: st.DataObject) -> None:
    import json

    record = sign_record(ALICE, data)
    raw = bytearray(canonical_json(record))
    index = draw.draw(st.integers(0, len(raw) - 1))
    raw[index] = draw.draw(st.integers(0, 255).filter(lambda b: b != raw[index]))
    try:
        changed = json.loads(bytes(raw))
    except ValueError:
        return  # no longer JSON: nothing to verify, and it is refused as malformed upstream
    if changed == record:
        return  # the change spelled the same JSON another way
    with pytest.raises(RecordError):
        verify_record(changed)


def test_base64_has_one_spelling() -> None:
    from p2prc_core.identity import b64decode

    text = b64encode(b"\x00" * 64)  # 86 characters: the last one carries 4 spare bits
    assert b64decode(text) == b"\x00" * 64
    for other in (text[:-1] + "B", text + "==", text[:-1] + "A=", " " + text):
        with pytest.raises(ValueError):
            b64decode(other)
