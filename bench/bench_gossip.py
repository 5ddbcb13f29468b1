"""A network of hundreds or thousands of peers in one process: the real Discovery, PeerTable
and exchange code over the in-process transport (the same request and answer bytes as
HTTP, no sockets), with the settings a server runs with (fan-out, newcomer limits, table
sizes). The tables live in memory (``MemoryTable``: the real merge, prune and answer code;
no file under it).

For each N:
1. **join:** each peer starts out knowing 3 random earlier ones; every round, every live
   peer updates once (one hop) in a random order; rounds until every peer knows every other,
   and the payload each peer moved per round meanwhile (busy);
2. **quiet:** one more round with nothing changed: payload per peer and per exchange, the
   time one refresh takes per node;
3. **news:** one peer changes its record: rounds until every peer holds the new version
   (goal: ceil(log2 N) + 2);
4. **churn:** rounds where 10% of the peers leave and as many join, and 5% change their
   record: payload per peer per round, how much of the live network each peer knows, and
   how many dead peers it still holds.

Payload is the JSON bodies of requests and answers, counted once, at the peer that asked.
"On the wire" adds 5.5 KB per exchange for TLS, HTTP headers and the signature (measured
before, see the issue) at both ends: the asker's and the asked one's.

``--baseline REF`` runs the same simulation with the code of git commit REF (a worktree in a
temporary folder) and prints it beside ours; REF's discovery asks every peer it knows,
every round, and sends 8 bytes per record it holds (``have``).

Run: .venv/bin/python bench/bench_gossip.py --sizes 100 1000 --baseline ec6abd3 \\
         --baseline-sizes 100
     .venv/bin/python bench/bench_gossip.py --exchange-sizes 100 1000 10000
"""

from __future__ import annotations

import argparse
import functools
import inspect
import ipaddress
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WIRE_OVERHEAD = 5500  # bytes per exchange, each way together: TLS, headers, signature
MAX_ROUNDS = 60


def simulate(n: int, seed: int, fanout: int, churn: float, churn_rounds: int,
             quick: bool, max_unverified: int | None = None) -> dict[str, Any]:
    import psutil

    import p2prc_plugins.address
    import p2prc_plugins.scoring
    from p2prc_core.config import Settings
    from p2prc_core.discovery import Discovery, InProcessTransport
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.models import Endpoint
    from p2prc_core.peertable import PeerTable, TableState
    from p2prc_core.plugins import make_plugin_manager
    from p2prc_core.records import sign_record

    hooks = make_plugin_manager(load_entrypoints=False, plugins=[
        ("address", p2prc_plugins.address), ("scoring", p2prc_plugins.scoring)])
    settings = Settings()
    rng = random.Random(seed)
    gossiping = "fanout" in inspect.signature(Discovery).parameters

    class MemoryTable(PeerTable):
        """The real table code on a state held in memory."""

        def __init__(self, self_id: str):
            super().__init__(Path("/nonexistent"), self_id, False, settings.max_table_peers,
                             max_unverified or settings.max_unverified_peers)
            self.state = TableState.from_json({})

        def snapshot(self) -> TableState:
            return self.state

        def update(self, change: Any) -> Any:
            result = change(self.state)
            if not hasattr(self.state, "changed_records"):  # older code: a fresh state
                self.state._order = None  # per update, so nothing computed went stale
            return result

    class Peer:
        def __init__(self, index: int):
            self.identity = NodeIdentity.generate()
            self.index = index
            self.seq = 1
            self.address = str(ipaddress.IPv6Address(f"2001:db8:{index >> 16:x}:"
                                                     f"{index & 0xffff:x}::1"))
            self.record = self.sign()
            self.table = MemoryTable(self.identity.node_id)
            extra: dict[str, Any] = {"fanout": fanout, "rng": random.Random(seed + index)} \
                if gossiping else {}
            self.discovery = Discovery(
                self.table, hooks, transport, lambda: self.record, concurrency=1, probes=1,
                max_failures=settings.peer_max_failures,
                max_records=settings.max_records_per_response,
                newcomers_per_peer=settings.exchange_newcomers_per_minute, **extra)
            self.endpoint = Endpoint(self.address, 8088)
            transport.serve(self.endpoint, self.table, lambda: self.record)

        def sign(self) -> dict[str, Any]:
            return sign_record(self.identity, {
                "name": f"peer{self.index}", "addresses": [self.address], "port": 8088,
                "seq": self.seq, "time": int(time.time()),
                "specs": {"cpus": 8, "memory": 16 << 30, "gpus": []}, "metadata": {},
                "version": "0.1.0"})

        def change(self) -> None:
            self.seq += 1
            self.record = self.sign()

    transport = InProcessTransport()
    transport.max_records = settings.max_records_per_response
    process = psutil.Process()
    rss_before = process.memory_info().rss
    live: dict[str, Peer] = {}
    made = 0

    def join(known: int = 3) -> Peer:
        nonlocal made
        peer = Peer(made)
        made += 1
        others = list(live.values())
        peer.table.merge([p.record for p in rng.sample(others, min(known, len(others)))])
        live[peer.identity.node_id] = peer
        return peer

    for _ in range(n):
        join()

    def one_round() -> dict[str, float]:
        order = list(live.values())
        rng.shuffle(order)
        payload, exchanges, worst, took = [], 0, 0.0, []
        for peer in order:
            if not peer.table.load():
                payload.append(0)
                continue
            started = time.perf_counter()
            summary = peer.discovery.update(hops=1)
            took.append(time.perf_counter() - started)
            moved = summary.bytes_sent + summary.bytes_received
            payload.append(moved)
            exchanges += summary.asked
            if summary.asked:
                worst = max(worst, moved / summary.asked)
        per_peer = statistics.mean(payload)
        asked = exchanges / len(order)
        return {"payload": per_peer, "per_exchange": per_peer / max(asked, 1e-9),
                "worst_exchange": worst, "asked": asked,
                "wire": per_peer + 2 * asked * WIRE_OVERHEAD,
                "refresh_ms": 1000 * statistics.mean(took) if took else 0.0}

    def everyone_knows_everyone() -> float:
        """The share of (peer, other live peer) pairs where the peer holds the other."""
        ids = set(live)
        held = sum(len(ids & set(p.table.load())) for p in live.values())
        return held / (len(ids) * (len(ids) - 1))

    result: dict[str, Any] = {"n": n, "gossip": gossiping}
    rounds, busy = 0, []
    while everyone_knows_everyone() < 1.0:
        rounds += 1
        if rounds > MAX_ROUNDS:
            break
        busy.append(one_round())
    result["join_rounds"] = rounds if rounds <= MAX_ROUNDS else None
    result["join_payload"] = statistics.mean(b["payload"] for b in busy) if busy else 0
    result["knows"] = everyone_knows_everyone()
    result["memory_per_node"] = (process.memory_info().rss - rss_before) / n
    result["entries"] = statistics.mean(len(p.table.load()) for p in live.values())
    quiet = one_round()
    result.update({f"quiet_{k}": v for k, v in quiet.items()})

    source = rng.choice(list(live.values()))
    source.change()
    news = 0
    while any(p.table.load().get(source.identity.node_id, {}) and
              p.table.load()[source.identity.node_id].record["seq"] != source.seq
              or source.identity.node_id not in p.table.load()
              for p in live.values() if p is not source):
        news += 1
        if news > MAX_ROUNDS:
            break
        one_round()
    result["news_rounds"] = news if news <= MAX_ROUNDS else None
    if quick:
        return result

    churned = []
    for _ in range(churn_rounds):
        leaving = rng.sample(list(live), int(len(live) * churn))
        for node_id in leaving:
            transport.down.add(live.pop(node_id).endpoint)
        for _ in leaving:
            join()
        for peer in rng.sample(list(live.values()), int(len(live) * churn / 2)):
            peer.change()
        churned.append(one_round())
    ids = set(live)
    result["churn_payload"] = statistics.mean(c["payload"] for c in churned)
    result["churn_wire"] = statistics.mean(c["wire"] for c in churned)
    result["churn_knows"] = everyone_knows_everyone()
    result["churn_dead_held"] = statistics.mean(
        len(set(p.table.load()) - ids) for p in live.values())
    return result


def quiet_exchange(n: int) -> dict[str, Any]:
    """Two nodes that hold the same ``n`` records (and each other's): the payload of one
    exchange between them, both ways, and how long building the asker's digest takes. A
    network of 10,000 does not fit one process; what one quiet exchange costs is measured
    here at that size instead (a quiet round is ``update_fanout`` of them each way)."""
    import p2prc_plugins.address
    import p2prc_plugins.scoring
    from p2prc_core.discovery import Discovery, InProcessTransport
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.models import Endpoint
    from p2prc_core.peertable import PeerTable
    from p2prc_core.plugins import make_plugin_manager
    from p2prc_core.records import sign_record

    hooks = make_plugin_manager(load_entrypoints=False, plugins=[
        ("address", p2prc_plugins.address), ("scoring", p2prc_plugins.scoring)])
    now = int(time.time())

    def record(identity: NodeIdentity, index: int) -> dict[str, Any]:
        return sign_record(identity, {
            "name": f"peer{index}", "addresses": [str(ipaddress.IPv6Address(
                f"2001:db8:{index >> 16:x}:{index & 0xffff:x}::1"))], "port": 8088,
            "seq": 1, "time": now, "specs": {"cpus": 8, "memory": 16 << 30, "gpus": []},
            "metadata": {}, "version": "0.1.0"})

    shared = [record(NodeIdentity.generate(), i) for i in range(n)]
    transport = InProcessTransport()
    with tempfile.TemporaryDirectory(prefix="p2prc-quiet-") as where:
        ids = [NodeIdentity.generate() for _ in range(2)]
        owns = [record(ids[0], n), record(ids[1], n + 1)]
        tables = [PeerTable(Path(where) / str(i), ids[i].node_id, max_peers=n + 2,
                            max_unverified=n + 2) for i in range(2)]
        for i in range(2):
            tables[i].merge([*shared, owns[1 - i]])
            transport.serve(Endpoint(owns[i]["addresses"][0], 8088), tables[i],
                            functools.partial(dict, owns[i]))
        asker = Discovery(tables[0], hooks, transport, lambda: owns[0], concurrency=1,
                          probes=1, max_records=500, fanout=4)
        asker.update(hops=1, only=[ids[1].node_id])  # first contact: learns b holds a
        state = tables[0].snapshot()
        started = time.perf_counter()
        state.versions(owns[0]).digest()  # once per change of the table: then kept
        digest_ms = (time.perf_counter() - started) * 1000
        quiet = asker.update(hops=1, only=[ids[1].node_id])
    return {"n": n, "exchange": quiet.bytes_sent + quiet.bytes_received,
            "sent": quiet.bytes_sent, "received": quiet.bytes_received,
            "digest_ms": digest_ms}


def inner(args: argparse.Namespace) -> None:
    for n in args.sizes:
        print(json.dumps(simulate(n, args.seed * 1000 + n, args.fanout, args.churn,
                                  args.churn_rounds, args.quick, args.max_unverified)),
              flush=True)


def baseline(ref: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same simulation with the code of commit ``ref``."""
    from common import older_code

    with older_code(ref) as tree:
        out = subprocess.run(
            [sys.executable, __file__, "--inner", "--sizes", *map(str, args.baseline_sizes),
             "--seed", str(args.seed), "--churn", str(args.churn), "--churn-rounds",
             str(args.churn_rounds), *(["--quick"] if args.quick else [])],
            env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True,
            text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def show(rows: list[dict[str, Any]], base: dict[int, dict[str, Any]]) -> None:
    def kb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1024:,.1f} KB"

    print(f"\n{'':>26}" + "".join(f"{'N=' + str(r['n']):>16}" for r in rows))
    lines = [
        ("join: rounds to all", lambda r: str(r["join_rounds"])),
        ("join: payload/peer/round", lambda r: kb(r["join_payload"])),
        ("quiet: payload/peer", lambda r: kb(r["quiet_payload"])),
        ("quiet: payload/exchange", lambda r: f"{r['quiet_per_exchange']:,.0f} B"),
        ("quiet: worst exchange", lambda r: f"{r['quiet_worst_exchange']:,.0f} B"),
        ("quiet: peers asked", lambda r: f"{r['quiet_asked']:.1f}"),
        ("quiet: on the wire/peer", lambda r: kb(r["quiet_wire"])),
        ("refresh time/node", lambda r: f"{r['quiet_refresh_ms']:,.1f} ms"),
        ("news: rounds to all", lambda r: f"{r['news_rounds']} (goal "
                                          f"{math.ceil(math.log2(r['n'])) + 2})"),
        ("memory/node (RSS)", lambda r: kb(r["memory_per_node"])),
        ("churn: payload/peer/round", lambda r: kb(r.get("churn_payload"))),
        ("churn: on the wire/peer", lambda r: kb(r.get("churn_wire"))),
        ("churn: live pairs known", lambda r: f"{100 * r['churn_knows']:.1f}%"
         if "churn_knows" in r else "-"),
        ("churn: dead peers held", lambda r: f"{r['churn_dead_held']:.0f}"
         if "churn_dead_held" in r else "-"),
    ]
    for label, cell in lines:
        row = f"{label:>26}"
        for r in rows:
            text = cell(r)
            if r["n"] in base:
                text = f"{text} | {cell(base[r['n']])}"
            row += f"{text:>16}" if r["n"] not in base else f"  {text}"
        print(row)
    if base:
        print("\n(ours | the baseline's, where the baseline ran at that N)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fanout", type=int, default=4)
    parser.add_argument("--churn", type=float, default=0.1)
    parser.add_argument("--churn-rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="join, quiet and news only")
    parser.add_argument("--max-unverified", type=int,
                        help="each table's max_unverified_peers (default: the setting's)")
    parser.add_argument("--baseline", metavar="REF", help="git commit to compare with")
    parser.add_argument("--baseline-sizes", type=int, nargs="+", default=[100])
    parser.add_argument("--exchange-sizes", type=int, nargs="+", metavar="N",
                        help="only: one quiet exchange between two nodes that hold the same "
                             "N records, at each N")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    if args.exchange_sizes:
        print(f"{'records held':>13} {'one quiet exchange':>20} {'(sent, received)':>18} "
              f"{'quiet round/peer':>17} {'digest':>9}")
        for n in args.exchange_sizes:
            got = quiet_exchange(n)
            per_round = 2 * args.fanout * (got["exchange"] + WIRE_OVERHEAD)
            print(f"{n:>13,} {got['exchange']:>18,} B {got['sent']:>8,}, "
                  f"{got['received']:>6,} {per_round / 1024:>14.1f} KB "
                  f"{got['digest_ms']:>7.1f}ms")
        print(f"\nquiet round per peer: {args.fanout} exchanges asked and as many answered, "
              f"each with {WIRE_OVERHEAD:,} B of TLS, headers and signature (goal: at most "
              f"64 KB, and 1 KB of payload an exchange)")
        return
    base = {r["n"]: r for r in baseline(args.baseline, args)} if args.baseline else {}
    rows = []
    for n in args.sizes:
        started = time.monotonic()
        rows.append(simulate(n, args.seed * 1000 + n, args.fanout, args.churn,
                             args.churn_rounds, args.quick, args.max_unverified))
        print(f"N={n}: simulated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    show(rows, base)


if __name__ == "__main__":
    main()
