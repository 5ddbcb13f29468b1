"""p2prc speedtest download over loopback against iperf3, in the same run, alternating.

On loopback this measures software, not a link.
Run: .venv/bin/python bench/bench_speedtest.py [--rounds 3] [--size 1G]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import P2PRC, free_port, iperf3_download, report, start_p2prc, stop

from p2prc_core.models import parse_size


def p2prc_download(port: int, size: int, home: Path) -> float:
    out = subprocess.run([P2PRC, "speedtest", f"127.0.0.1:{port}", "--bytes", str(size),
                          "--download-only", "--json"], capture_output=True, text=True,
                         check=True, env={**os.environ, "P2PRC_HOME": str(home)}).stdout
    return float(json.loads(out)["transfers"][0]["mbit_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="1G")
    args = parser.parse_args()
    size = parse_size(args.size)
    if not shutil.which("iperf3"):
        raise SystemExit("iperf3 is not installed: apt-get install -y iperf3")
    home = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    port = free_port()
    server = start_p2prc(home / "server", port)
    try:
        ours, base = [], []
        for _ in range(args.rounds):
            ours.append(p2prc_download(port, size, home / "client"))
            base.append(iperf3_download("127.0.0.1", free_port(), size))
        report(f"download of {args.size} over 127.0.0.1, {args.rounds} rounds",
               "p2prc speedtest", ours, "iperf3 -R", base, "Mbit/s", ">= 0.50")
    finally:
        stop(server)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
