"""Discovery: rounds until every peer knows every other, and bytes each peer sent, against
the original design (every peer posts its whole table to every peer it knows, each hop).

N peers each start out knowing one random earlier peer. In a round every peer, in a random
order, updates once (one hop). Both designs run on the same starting tables and orders;
ours runs the real code (Discovery, PeerTable, handle_exchange) over the in-process
transport, which carries the same JSON bytes as HTTP would.

Run: .venv/bin/python bench/bench_discovery.py [--sizes 10 25 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import p2prc_plugins.address
import p2prc_plugins.scoring
from p2prc_core.discovery import Discovery, InProcessTransport
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.peertable import PeerTable
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.records import merge_records, sign_record

HOOKS = make_plugin_manager(load_entrypoints=False, plugins=[
    ("address", p2prc_plugins.address), ("scoring", p2prc_plugins.scoring)])
MAX_ROUNDS = 30


def make_records(n: int) -> list[dict[str, Any]]:
    now = int(time.time())
    return [sign_record(NodeIdentity.generate(), {
        "name": f"peer{i}", "addresses": [f"2001:db8::{i + 1:x}", f"198.51.100.{i + 1}"],
        "port": 8088, "seq": 1, "time": now, "specs": {"cpus": 8, "memory": 16 << 30,
                                                       "gpus": []},
        "metadata": {}, "version": "0.1.0"}) for i in range(n)]


def starting_links(n: int, rng: random.Random) -> list[int | None]:
    return [None] + [rng.randrange(i) for i in range(1, n)]


def orders(n: int, rng: random.Random) -> list[list[int]]:
    result = []
    for _ in range(MAX_ROUNDS):
        order = list(range(n))
        rng.shuffle(order)
        result.append(order)
    return result


def run_ours(records: list[dict[str, Any]], links: list[int | None],
             rounds: list[list[int]], root: Path) -> tuple[int, list[int], float]:
    n = len(records)
    transport = InProcessTransport()
    tables, discoveries, endpoints = [], [], []
    for i, record in enumerate(records):
        table = PeerTable(root / f"p{i}", record["node_id"])
        endpoint = Endpoint(record["addresses"][0], 8088)
        transport.serve(endpoint, table, lambda record=record: record)
        tables.append(table)
        endpoints.append(endpoint)
        discoveries.append(Discovery(table, HOOKS, transport, lambda record=record: record,
                                     concurrency=1, probes=1))
    for i, link in enumerate(links):
        if link is not None:
            tables[i].merge([records[link]])
    sent = [0] * n
    for number, order in enumerate(rounds, 1):
        for i in order:
            if tables[i].load():
                sent[i] += discoveries[i].update(hops=1).bytes_sent
        if all(len(t.load()) == n - 1 for t in tables):
            served = [transport.bytes_served[e] for e in endpoints]
            total = [s + r for s, r in zip(sent, served, strict=True)]
            # One more round, once everyone knows everyone: what a quiet network costs.
            after = sum(discoveries[i].update(hops=1).bytes_sent for i in range(n))
            after += sum(transport.bytes_served[e] for e in endpoints) - sum(served)
            return number, total, after / n
    raise SystemExit("ours did not converge")


def run_original(records: list[dict[str, Any]], links: list[int | None],
                 rounds: list[list[int]]) -> tuple[int, list[int], float]:
    """Each exchange: the asker posts its whole table (its own record included), the other
    answers with its whole table; both merge."""
    n = len(records)
    held: list[dict[str, dict[str, Any]]] = [{} for _ in range(n)]
    index = {r["node_id"]: i for i, r in enumerate(records)}
    for i, link in enumerate(links):
        if link is not None:
            held[i][records[link]["node_id"]] = records[link]
    sent = [0] * n

    def one_round(order: list[int]) -> None:
        for i in order:
            for peer_id in list(held[i]):
                j = index[peer_id]
                mine = json.dumps({"records": [records[i], *held[i].values()]},
                                  separators=(",", ":"))
                theirs = json.dumps({"records": [records[j], *held[j].values()]},
                                    separators=(",", ":"))
                sent[i] += len(mine)
                sent[j] += len(theirs)
                merge_records(held[j], json.loads(mine)["records"], records[j]["node_id"])
                merge_records(held[i], json.loads(theirs)["records"], records[i]["node_id"])

    for number, order in enumerate(rounds, 1):
        one_round(order)
        if all(len(h) == n - 1 for h in held):
            total = list(sent)
            one_round(list(range(n)))
            return number, total, (sum(sent) - sum(total)) / n
    raise SystemExit("the original design did not converge")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"{'N':>4} {'rounds':>7} {'orig':>5} {'target':>7}   {'bytes/peer ours':>16} "
          f"{'original':>12} {'ratio':>6}   {'quiet round ours':>17} {'original':>10}")
    for n in args.sizes:
        rng = random.Random(args.seed * 1000 + n)
        records = make_records(n)
        links, schedule = starting_links(n, rng), orders(n, rng)
        root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
        try:
            ours_rounds, ours_sent, ours_quiet = run_ours(records, links, schedule, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        orig_rounds, orig_sent, orig_quiet = run_original(records, links, schedule)
        target = math.ceil(math.log2(n)) + 2
        ours_mean, orig_mean = statistics.mean(ours_sent), statistics.mean(orig_sent)
        print(f"{n:>4} {ours_rounds:>7} {orig_rounds:>5} {'<=' + str(target):>7}   "
              f"{ours_mean:>16,.0f} {orig_mean:>12,.0f} {ours_mean / orig_mean:>6.3f}   "
              f"{ours_quiet:>17,.0f} {orig_quiet:>10,.0f}")
    print("\nrounds: until every peer knows every other; bytes: mean per peer of the request "
          "and answer bodies it sent, until then (target at N = 50: ratio <= 0.25); quiet "
          "round: bytes per peer of one more round once every peer knows every other.")


if __name__ == "__main__":
    main()
