"""Wall time of a two-task playbook on 1, 2 and 4 containers: 'p2prc run' against
ansible-playbook run by hand on the same inventory, alternating, in one run.
Needs root, a Docker engine and the base image (scripts/docker-engine).

Run: .venv/bin/python bench/bench_run.py [--sizes 1 2 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import P2PRC, ROOT, free_port, median, start_p2prc, stop

from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

PLAYBOOK = ROOT / "contrib" / "playbooks" / "twotasks"
BIN = str(Path(sys.executable).parent)


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    me = root / "me"
    TrustStore(root / "host").add(NodeIdentity.load_or_create(me).node_id)
    port = free_port()
    server = start_p2prc(root / "host", port, P2PRC_CONTAINERS_PER_CALLER="16",
                         P2PRC_PORT_RANGE="43100-43199", P2PRC_REFRESH_SECONDS="0")
    env = {**os.environ, "P2PRC_HOME": str(me), "PATH": BIN + os.pathsep + os.environ["PATH"],
           "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_TIMEOUT": "20",
           "ANSIBLE_RETRY_FILES_ENABLED": "False", "LC_ALL": "C.UTF-8"}
    ids = []
    try:
        subprocess.run([P2PRC, "playbooks", "add", str(PLAYBOOK)], env=env, check=True,
                       capture_output=True)
        for _ in range(max(args.sizes)):
            out = subprocess.run([P2PRC, "touch", f"127.0.0.1:{port}", "--json"], env=env,
                                 check=True, capture_output=True, text=True).stdout
            ids.append(json.loads(out)["id"][:12])
        print(f"{'containers':>10} {'p2prc run':>11} {'ansible-playbook':>17} {'ratio':>6}"
              f"   (median of {args.rounds}, seconds; target ratio <= 1.1)")
        for size in args.sizes:
            targets = [arg for cid in ids[:size] for arg in ("--on", cid)]
            ours_argv = [P2PRC, "run", "twotasks", *targets, "--json"]
            timed(ours_argv, env)  # warm up, and leave an inventory to reuse
            last = sorted((me / "runs").iterdir())[-1]
            inventory = str(last / "inventory" / "hosts.json")
            hand_argv = [str(Path(BIN) / "ansible-playbook"), "-i", inventory,
                         "-f", str(size), str(PLAYBOOK / "site.yml")]
            ours, hand = [], []
            for _ in range(args.rounds):
                ours.append(timed(ours_argv, env))
                hand.append(timed(hand_argv, env))
            print(f"{size:>10} {median(ours):>11.2f} {median(hand):>17.2f} "
                  f"{median(ours) / median(hand):>6.2f}")
    finally:
        for cid in ids:
            subprocess.run([P2PRC, "rm", cid], env=env, capture_output=True)
        stop(server)


if __name__ == "__main__":
    main()
