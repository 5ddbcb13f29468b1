"""Requests per second on /v1/specs against a bare Falcon hello-world app.

Both run under the same embedded gunicorn settings, TLS 1.3 included (keep-alive
connections); wrk loads each in turn, alternating.
Run: .venv/bin/python bench/bench_specs_rps.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, report, start_p2prc, stop, wait_http


def wrk(url: str, seconds: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise SystemExit(f"wrk printed no rate:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1,
                        help="gunicorn workers of both servers (with several, how wrk's "
                             "keep-alive connections happen to spread over them swings the "
                             "rate between runs by 2-3x)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    home = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    same = {"P2PRC_WORKERS": str(args.workers)}
    env = {**os.environ, "P2PRC_HOME": str(home), "P2PRC_ACCESS_LOG": "false", **same}
    ours_port, base_port = free_port(), free_port()
    ours = start_p2prc(home, ours_port, **same)
    base = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_hello.py")),
                             str(base_port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"https://127.0.0.1:{base_port}/v1/specs", base)
        ours_url = f"https://127.0.0.1:{ours_port}/v1/specs"
        base_url = f"https://127.0.0.1:{base_port}/v1/specs"
        wrk(ours_url, 1, args.connections)
        wrk(base_url, 1, args.connections)  # warm both up
        ours_rates, base_rates = [], []
        for _ in range(args.rounds):
            ours_rates.append(wrk(ours_url, args.seconds, args.connections))
            base_rates.append(wrk(base_url, args.seconds, args.connections))
        report(f"GET /v1/specs over TLS, wrk -c{args.connections}, {args.workers} worker(s), "
               f"{args.seconds} s x {args.rounds}",
               "p2prc /v1/specs", ours_rates, "bare Falcon hello world", base_rates,
               "req/s", ">= 0.70")
    finally:
        stop(ours)
        stop(base)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
