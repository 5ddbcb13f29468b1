"""The command line's start, side by side in one run: ``p2prc --help``, ``p2prc version`` and
``p2prc peers ls`` (a fresh home, an empty table) against ``python -c pass`` of the same
interpreter, alternating, each from its start to its end as a user waits for it. Targets
(issue 27): each command in at most 0.15 s.

Run: .venv/bin/python bench/bench_cli_start.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import P2PRC, median, report

COMMANDS = (["--help"], ["version"], ["peers", "ls"])


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-cli-") as home:
        env = {**os.environ, "P2PRC_HOME": home}
        timed([P2PRC, "id"], env)  # the home and its key exist, as on a user's machine
        ours: dict[str, list[float]] = {" ".join(c): [] for c in COMMANDS}
        bare: list[float] = []
        for _ in range(args.rounds):
            bare.append(timed([sys.executable, "-c", "pass"], env))
            for command in COMMANDS:
                ours[" ".join(command)].append(timed([P2PRC, *command], env))
    for name, runs in ours.items():
        report(f"p2prc {name}, {args.rounds} rounds", f"p2prc {name}", runs,
               "python -c pass", bare, "ms", "at most 150 ms")
        print(f"  difference {median(runs) - median(bare):.1f} ms")


if __name__ == "__main__":
    main()
