"""Signed peer records: what a node says about itself, which nobody else can forge."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2prc_core.identity import (
    NodeIdentity,
    b64decode,
    b64encode,
    canonical_json,
    is_node_id,
    node_id_for,
    verify,
)
from p2prc_core.models import json_depth, parse_endpoint
from p2prc_core.storage import update_json
from p2prc_core.text import rough_duration

RECORD_STATE_FILE = "record.json"
MAX_FUTURE_SECONDS = 600  # a record dated further ahead than this is refused
CLOCK_SLACK = 60  # this node's own record dated further ahead of its clock is signed again
MAX_ADDRESSES = 16
MAX_NAME = 64
MAX_EXTRA_BYTES = 4096  # specs and metadata together, as canonical JSON
MAX_EXTRA_DEPTH = 8  # and how deeply they may nest

# field name -> accepted types
_FIELDS: dict[str, tuple[type, ...]] = {
    "node_id": (str,), "public_key": (str,), "name": (str,), "addresses": (list,),
    "port": (int,), "seq": (int,), "time": (int,), "specs": (dict,), "metadata": (dict,),
    "version": (str,), "signature": (str,),
}


# optional fields: older records lack them
_OPTIONAL: dict[str, tuple[type, ...]] = {"relays": (list,), "relay": (bool,)}
MAX_RELAYS = 4


class RecordError(ValueError):
    """A record that must be dropped; ``reason`` is a short word for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _content(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "signature"}


def sign_record(identity: NodeIdentity, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with this node's id and key, signed."""
    record = {**fields, "node_id": identity.node_id, "public_key": b64encode(identity.public_key)}
    record["signature"] = b64encode(identity.sign(canonical_json(_content(record))))
    return record


def verify_record(record: Any, now: float | None = None) -> dict[str, Any]:
    """Check a record's form, that its id matches its key, and its signature.

    :return: the record, unchanged.
    :raises RecordError: with the reason it is dropped.
    """
    if not isinstance(record, dict):
        raise RecordError("malformed", "a record must be a JSON object")
    for name, kinds in _FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise RecordError("malformed", f"record field {name!r} is missing or of the wrong type")
    for name, kinds in _OPTIONAL.items():
        if name in record and not isinstance(record[name], kinds):
            raise RecordError("malformed", f"record field {name!r} is of the wrong type")
    unknown = sorted(set(record) - set(_FIELDS) - set(_OPTIONAL))
    if unknown:
        raise RecordError("malformed", f"unknown record fields {unknown}")
    if not is_node_id(record["node_id"]):
        raise RecordError("malformed", "node_id is not a node id")
    if not 0 < record["port"] < 65536 or record["seq"] < 0:
        raise RecordError("malformed", "port or seq out of range")
    addresses = record["addresses"]
    if len(addresses) > MAX_ADDRESSES or not all(isinstance(a, str) and len(a) <= 64
                                                 for a in addresses):
        raise RecordError("malformed", f"addresses must be at most {MAX_ADDRESSES} strings")
    relays = record.get("relays", [])
    if len(relays) > MAX_RELAYS or not all(isinstance(r, str) and len(r) <= 96
                                           and _is_relay(r) for r in relays):
        raise RecordError("malformed", f"relays must be at most {MAX_RELAYS} "
                                       f"NODE_ID@ADDRESS:PORT strings")
    if len(record["name"]) > MAX_NAME:
        raise RecordError("malformed", f"name longer than {MAX_NAME} characters")
    if json_depth([record["specs"], record["metadata"]]) > MAX_EXTRA_DEPTH:
        raise RecordError("malformed", f"specs or metadata nested deeper than "
                                       f"{MAX_EXTRA_DEPTH} levels")
    try:
        public_key = b64decode(record["public_key"])
        signature = b64decode(record["signature"])
        extra = canonical_json([record["specs"], record["metadata"]])
        message = canonical_json(_content(record))
    except ValueError as err:
        raise RecordError("malformed", f"record cannot be decoded: {err}") from None
    if len(extra) > MAX_EXTRA_BYTES:
        raise RecordError("malformed", f"specs and metadata over {MAX_EXTRA_BYTES} bytes")
    if len(public_key) != 32 or node_id_for(public_key) != record["node_id"]:
        raise RecordError("id-mismatch", "node_id does not belong to the record's public key")
    if not verify(public_key, signature, message):
        raise RecordError("bad-signature", "the record's signature does not verify")
    now = time.time() if now is None else now
    if record["time"] > now + MAX_FUTURE_SECONDS:  # compared, not subtracted: ints are any size
        ahead = rough_duration(record["time"] - now) if record["time"] < 1 << 53 else "years"
        raise RecordError("future", f"the record is dated in the future, {ahead} ahead of this "
                                    f"node's clock: this clock, or that of the node that "
                                    f"signed it, is wrong")
    return record


def dated_ahead(record: dict[str, Any], now: float) -> bool:
    """Whether this node's own ``record`` is dated more than ``CLOCK_SLACK`` after ``now``
    (the clock that signed it went back since): it must be signed again."""
    stamp = record.get("time")
    return isinstance(stamp, int | float) and stamp > now + CLOCK_SLACK


def _is_relay(text: str) -> bool:
    try:
        endpoint = parse_endpoint(text)
    except ValueError:
        return False
    return endpoint.node_id is not None


@dataclass
class MergeResult:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


def _held_already(record: Any, held: dict[str, dict[str, Any]]) -> bool:
    """Exactly the record held, verified when it was taken: no crypto needed."""
    return isinstance(record, dict) and held.get(record.get("node_id", "")) == record


def verified_records(incoming: list[Any], held: dict[str, dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The records of ``incoming`` that verify (or are exactly one ``held``), each checked
    once; and, by reason, how many were dropped."""
    kept: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for record in incoming:
        if not _held_already(record, held):
            try:
                verify_record(record)
            except RecordError as err:
                dropped[err.reason] += 1
                continue
        kept.append(record)
    return kept, dropped


def merge_records(held: dict[str, dict[str, Any]], incoming: list[Any],
                  self_id: str | None = None, verified: bool = False) -> MergeResult:
    """Merge ``incoming`` into ``held`` (node id -> record), in place.

    A record is dropped when it fails ``verify_record`` (not checked again when the caller
    says they were: ``verified``, from ``verified_records``), is older (lower seq) than the
    one held, claims the held seq with other content, or is this node's own.
    """
    result = MergeResult()
    for record in incoming:
        if _held_already(record, held):
            result.unchanged += 1
            continue
        if not verified:
            try:
                verify_record(record)
            except RecordError as err:
                result.dropped[err.reason] += 1
                continue
        node_id = record["node_id"]
        if node_id == self_id:
            result.dropped["self"] += 1
            continue
        current = held.get(node_id)
        if current is None:
            held[node_id] = record
            result.added.append(node_id)
        elif record["seq"] > current["seq"]:
            held[node_id] = record
            result.updated.append(node_id)
        elif record["seq"] < current["seq"]:
            result.dropped["older"] += 1
        elif record["signature"] == current["signature"]:
            result.unchanged += 1
        else:
            result.dropped["conflict"] += 1  # same seq, other content: keep the first seen
    return result


class RecordPublisher:
    """This node's own signed record; its seq grows whenever its content changes."""

    def __init__(self, home: Path, identity: NodeIdentity):
        self.path = home / RECORD_STATE_FILE
        self.identity = identity

    def current(self, fields: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """The signed record for ``fields`` (name, addresses, port, specs, metadata, version).
        It is signed again (a new seq) when its content changed, and when it is dated ahead
        of ``now``: this clock went back, and peers drop a record from their future.

        Safe across processes: the seq and the last record live in ``record.json``.
        """
        digest = hashlib.sha256(canonical_json(fields)).hexdigest()
        now = time.time() if now is None else now

        def publish(state: dict[str, Any]) -> dict[str, Any]:
            record = state.get("record")
            if (state.get("digest") == digest and isinstance(record, dict)
                    and record.get("node_id") == self.identity.node_id
                    and not dated_ahead(record, now)):
                return record
            seq = int(state.get("seq", 0)) + 1
            record = sign_record(self.identity, {**fields, "seq": seq, "time": int(now)})
            state.update(seq=seq, digest=digest, record=record)
            return record

        return update_json(self.path, publish)
