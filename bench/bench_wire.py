"""Decoding and checking wire messages: 1,000 container replies and an exchange answer of
1,000 records, the way the code did it before ``p2prc_core.wire`` (``loads_strict``, then
hand-written checks) against the typed definitions (msgspec), side by side in one run.

Run: .venv/bin/python bench/bench_wire.py [--count 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from p2prc_core.models import CONTAINER_ID, PUBLIC_KEY, Address, Endpoint, loads_strict
from p2prc_core.my_containers import RemoteContainer
from p2prc_core.wire import ContainerReply, ExchangeAnswer, SshLogin, decode

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0w6nHbH0Fo5L3mO0r4DhV0q1wJm7o3pQ2g5bJk9x1f"
ENDPOINT = Endpoint("fd42::1", 8088)
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,255}")


def make_replies(count: int) -> list[bytes]:
    replies = []
    for index in range(count):
        container_id = f"{index:064x}"
        port = 42000 + index % 1000
        replies.append(json.dumps({
            "id": container_id, "owner": "a" * 26, "image": "p2prc/base:latest",
            "ports": [{"name": "ssh", "internal": 22, "external": port},
                      {"name": "port1", "internal": port + 1, "external": port + 1}],
            "created": 1.7e9, "expires": 1.7e9 + 600, "host_key": HOST_KEY, "gpu": False,
            "gpus": [], "cpus": 1.0, "memory": 1 << 30, "state": "running", "direct": False,
            "node_id": "b" * 26,
            "ssh": {"user": "root", "host": "fd42::1", "port": port, "host_key": HOST_KEY,
                    "fingerprint": SshLogin.of(container_id, "fd42::1", port, HOST_KEY,
                                               False).fingerprint,
                    "command": f"p2prc ssh {container_id[:12]}"}}).encode())
    return replies


def make_answer(count: int) -> bytes:
    records = [{"node_id": f"{index:026d}", "public_key": "k" * 44, "name": f"node-{index}",
                "addresses": [f"2001:db8::{index:x}", "192.0.2.1"], "port": 8088, "seq": 1,
                "time": 1_700_000_000, "specs": {"cpus": 8, "memory": 16 << 30, "gpus": []},
                "metadata": {}, "version": "0.1.0", "signature": "s" * 88}
               for index in range(count)]
    return json.dumps({"records": records, "cursor": "e:1000", "more": False,
                       "holds_seq": 3, "observed": "203.0.113.9"}).encode()


# -- before: the code path of p2prc_core before wire.py, kept here to measure against -------


def _port(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise ValueError(f"{value!r} is not a port")


def _time(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and \
            math.isfinite(value) and 0 <= value <= 253402300799:
        return float(value)
    raise ValueError(f"{value!r} is not a time")


def reply_before(raw: bytes) -> RemoteContainer:
    """``loads_strict`` and ``RemoteContainer.from_reply`` as they were."""
    reply = loads_strict(raw)
    if not isinstance(reply, dict) or not isinstance(reply.get("ssh"), dict):
        raise ValueError("not a container")
    container_id, host_key = reply.get("id"), reply["ssh"].get("host_key")
    if not isinstance(container_id, str) or not CONTAINER_ID.fullmatch(container_id):
        raise ValueError("id")
    if not isinstance(host_key, str) or not PUBLIC_KEY.fullmatch(host_key):
        raise ValueError("host key")
    ports = reply.get("ports")
    if not isinstance(ports, list) or not ports or len(ports) > 65:
        raise ValueError("ports")
    checked = [{"name": str(p["name"])[:32], "internal": _port(p["internal"]),
                "external": _port(p["external"])} for p in ports if isinstance(p, dict)]
    if len(checked) != len(ports) or checked[0]["external"] != _port(reply["ssh"].get("port")):
        raise ValueError("ports")
    image = reply.get("image")
    if not isinstance(image, str) or not _IMAGE.fullmatch(image):
        raise ValueError("image")
    gpus = reply.get("gpus", [])
    if not isinstance(gpus, list) or len(gpus) > 64 or not all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 64 for g in gpus):
        raise ValueError("gpus")
    direct = reply.get("direct", False)
    if not isinstance(direct, bool):
        raise ValueError("direct")
    node_id = reply.get("node_id")
    return RemoteContainer(
        id=container_id, endpoint=ENDPOINT.path, host=ENDPOINT.host,
        ssh_port=checked[0]["external"], host_key=host_key, ports=checked, image=image,
        created=_time(reply.get("created")), expires=_time(reply.get("expires")),
        node_id=node_id if isinstance(node_id, str) else None,
        gpu=reply.get("gpu") is True, gpus=sorted(set(gpus)), direct=direct)


def answer_before(raw: bytes) -> dict[str, Any]:
    """``discovery.parse_answer`` as it was."""
    data = loads_strict(raw)
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) \
            or not isinstance(data.get("cursor"), str) or len(data["cursor"]) > 64:
        raise ValueError("unknown form")
    data["more"] = data.get("more") is True
    observed = data.get("observed")
    try:
        data["observed"] = str(Address.parse(observed)) \
            if isinstance(observed, str) and len(observed) <= 64 else None
    except ValueError:
        data["observed"] = None
    return data


# -- after: the typed definitions ------------------------------------------------------------


def reply_after_typed(raw: bytes) -> ContainerReply:
    """``wire.decode`` alone: the bytes to a checked ``ContainerReply`` in one pass."""
    return decode(raw, ContainerReply)


def reply_client_path(raw: bytes) -> RemoteContainer:
    """What ``PeerClient.create_container`` does now: the answer's bytes straight to
    ``RemoteContainer.from_reply`` (``wire.decode``: parsed and checked in one pass), which
    also checks the ``ssh`` block against the one rule (``SshLogin.completed``)."""
    return RemoteContainer.from_reply(raw, ENDPOINT)


def answer_after(raw: bytes) -> ExchangeAnswer:
    return decode(raw, ExchangeAnswer)


def timed(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def line(label: str, seconds: float, count: int) -> None:
    print(f"  {label:<44} {seconds * 1e3:8.2f} ms  {seconds / count * 1e6:7.2f} us/message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n, rounds = args.count, args.rounds
    replies = make_replies(n)
    answer = make_answer(n)

    before = timed(lambda: [reply_before(r) for r in replies], rounds)
    typed = timed(lambda: [reply_after_typed(r) for r in replies], rounds)
    client = timed(lambda: [reply_client_path(r) for r in replies], rounds)
    print(f"\n{n} container replies ({sum(map(len, replies)) / 1024:.0f} KiB), median of "
          f"{rounds} rounds")
    line("before: loads_strict + hand checks", before, n)
    line("after: wire.decode (typed, checked)", typed, n)
    line("after: from_reply(bytes) (client path)", client, n)
    print(f"  ratio wire.decode/before {typed / before:.2f}, client path/before "
          f"{client / before:.2f}")

    before = timed(lambda: answer_before(answer), rounds)
    after = timed(lambda: answer_after(answer), rounds)
    print(f"\nan exchange answer of {n} records ({len(answer) / 1024:.0f} KiB), median of "
          f"{rounds} rounds (form only: each record's signature is checked on merge, as "
          f"before)")
    line("before: parse_answer (loads_strict + checks)", before, n)
    line("after: wire.decode(ExchangeAnswer)", after, n)
    print(f"  ratio after/before {after / before:.2f}")


if __name__ == "__main__":
    main()
