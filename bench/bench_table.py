"""A table of many peers (10,000 by default): how long `p2prc peers ls`, `p2prc peers ls
--json` and choosing the best peer (`p2prc.Node.peers()[0]`, as `exec` and the dashboard's
Peers page do) take, each in a fresh process, with this code and with the code of an
earlier commit (``--baseline REF``, in a temporary git worktree) on the same table.

Ours is timed three ways: "kept", with the rows kept in the home (``peers-view.json``,
made by the listing before, or by a running server after its refresh); "one changed", with
one peer's entry changed before each run (what an exchange a peer started, or a refresh,
leaves: only that peer's row is made again); and "made", with the view removed before each
run (the first listing ever, or after the plugins changed).

Run: .venv/bin/python bench/bench_table.py [--peers 10000] [--rounds 3] [--baseline ec6abd3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import ROOT, median, older_code

BEST = "import p2prc; p2prc.Node.open().peers()[0]"
STEPS = {"peers ls": ["-m", "p2prc_core", "peers", "ls"],
         "peers ls --json": ["-m", "p2prc_core", "peers", "ls", "--json"],
         "best peer": ["-c", BEST]}


def make_table(home: Path, count: int) -> None:
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.peertable import PeerTable
    from p2prc_core.records import sign_record

    now = int(time.time())
    records = [sign_record(NodeIdentity.generate(), {
        "name": f"peer{i}", "addresses": [f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1",
                                          f"198.51.{(i >> 8) & 255}.{i & 255}"],
        "port": 8088, "seq": 1, "time": now,
        "specs": {"cpus": 8, "memory": 16 << 30, "gpus": []}, "metadata": {},
        "version": "0.1.0"}) for i in range(count)]
    table = PeerTable(home, NodeIdentity.load_or_create(home).node_id, max_peers=count + 1,
                      max_unverified=count + 1)
    table.merge(records)


def change_one(home: Path, count: int) -> None:
    """One peer's measured latency changed, as an exchange with it would."""
    import random

    from p2prc_core.peertable import PeerTable

    table = PeerTable(home, max_peers=count + 1, max_unverified=count + 1)

    def change(state: object) -> None:
        entry = random.choice(list(state.peers.values()))  # type: ignore[attr-defined]
        entry.measured.latency_ms = random.uniform(1, 100)
    table.update(change)


def timed(code: Path, home: Path, argv: list[str], rounds: int, keep: bool = True,
          before: Callable[[], None] | None = None) -> float:
    """The median of ``rounds`` runs; ``keep``: with the view the run before left (one run
    first makes it), else with none; ``before``: done before each run."""
    env = {**os.environ, "P2PRC_HOME": str(home), "PYTHONPATH": str(code),
           "P2PRC_MAX_TABLE_PEERS": "100000", "P2PRC_MAX_UNVERIFIED_PEERS": "100000"}
    took = []
    view = home / "peers-view.json"
    if keep:
        subprocess.run([sys.executable, *argv], env=env, check=True, stdout=subprocess.DEVNULL,
                       cwd=code)
    for _ in range(rounds):
        if not keep:
            view.unlink(missing_ok=True)
        if before is not None:
            before()
        started = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env, check=True, stdout=subprocess.DEVNULL,
                       cwd=code)  # (-m and -c put the working folder first on the path)
        took.append(time.perf_counter() - started)
    return median(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="REF", default="ec6abd3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2prc-table-") as where:
        home = Path(where) / "home"
        make_table(home, args.peers)
        size = (home / "peers.json").stat().st_size
        print(f"{args.peers:,} peers, peers.json {size / 1e6:.1f} MB; median of "
              f"{args.rounds} fresh processes each\n")
        print(f"{'':>18} {'ours, kept':>11} {'one changed':>12} {'ours, made':>11} "
              f"{args.baseline:>9} {'ratio':>6}")
        with older_code(args.baseline) as before:
            for label, argv in STEPS.items():
                kept = timed(ROOT, home, argv, args.rounds)
                changed = timed(ROOT, home, argv, args.rounds,
                                before=lambda: change_one(home, args.peers))
                made = timed(ROOT, home, argv, args.rounds, keep=False)
                theirs = timed(before, home, argv, args.rounds, keep=False)
                print(f"{label:>18} {kept:>10.2f}s {changed:>11.2f}s {made:>10.2f}s "
                      f"{theirs:>8.2f}s {kept / theirs:>6.2f}")
    print("\nratio: ours with the rows kept against the baseline; goal: each under 0.3 s at "
          "10,000 peers")


if __name__ == "__main__":
    main()
