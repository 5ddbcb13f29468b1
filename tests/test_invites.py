"""Redeeming an invite on the host: the joiner is trusted, and its record is checked once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from p2prc_core import records, trust
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.trust import ServerState, TrustError, TrustStore, accept_invite


def joiner_record(identity: NodeIdentity) -> dict[str, object]:
    return records.sign_record(identity, {
        "name": "carol", "addresses": ["2001:db8::7"], "port": 8088, "seq": 1,
        "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})


def test_a_joiners_record_is_verified_once_and_kept(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    joiner = NodeIdentity.generate()
    state, store, table = ServerState(tmp_path), TrustStore(tmp_path), PeerTable(tmp_path)
    secret, _ = state.create_invite(60)
    calls = []
    real = records.verify_record
    for module in (records, trust):  # wherever it is called from
        monkeypatch.setattr(module, "verify_record", lambda r: calls.append(1) or real(r),
                            raising=False)
    name = accept_invite(state, store, table, joiner.node_id, secret, joiner_record(joiner))
    assert name == "carol" and store.is_trusted(joiner.node_id)
    assert joiner.node_id in table.load() and len(calls) == 1


def test_a_joiner_with_anothers_record_is_trusted_without_it(tmp_path: Path) -> None:
    joiner, other = NodeIdentity.generate(), NodeIdentity.generate()
    state, store, table = ServerState(tmp_path), TrustStore(tmp_path), PeerTable(tmp_path)
    secret, _ = state.create_invite(60)
    assert accept_invite(state, store, table, joiner.node_id, secret,
                         joiner_record(other)) == ""
    assert store.is_trusted(joiner.node_id)
    assert other.node_id not in (table.load() if table.path.exists() else {})
    with pytest.raises(TrustError):  # used once
        accept_invite(state, store, table, joiner.node_id, secret, None)


def test_a_hand_edited_trust_file_reads_each_field_checked(tmp_path: Path) -> None:
    node_id = NodeIdentity.generate().node_id
    (tmp_path / "trusted.json").write_text(json.dumps(
        {node_id: {"name": 7, "since": True, "via": None}, "x": "not an object"}))
    store = TrustStore(tmp_path)
    assert store.all()[node_id] == trust.Trusted(name="", since=None, via="")
    assert store.names() == {node_id: "", "x": ""} and store.is_trusted(node_id)
