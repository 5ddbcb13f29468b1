"""p2prc speedtest download over TLS against iperf3 on a link shaped to 1 Gbit/s.

A friend in a network namespace downloads from a p2prc server in the root namespace across a
veth whose sending side is shaped with tbf (the kernel here has no netem); iperf3 -R crosses
the same veth. Alternating, the same number of bytes. Needs root.

Run: .venv/bin/python bench/bench_speedtest_link.py [--rounds 3] [--size 300M] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, iperf3_download, report, start_p2prc, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netlab import NetLab, available  # noqa: E402

from p2prc_core.models import parse_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="300M")
    parser.add_argument("--rate", default="1gbit")
    args = parser.parse_args()
    size = parse_size(args.size)
    reason = available()
    if reason or not shutil.which("iperf3"):
        raise SystemExit(reason or "iperf3 is not installed: apt-get install -y iperf3")
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    lab = NetLab(root / "lab")
    server = None
    try:
        friend = lab.add_host("friend")
        shaped = f"p2p{lab.tag[:4]}2"  # the friend's veth, bridge side: what it receives
        subprocess.run(["tc", "qdisc", "add", "dev", shaped, "root", "tbf", "rate", args.rate,
                        "burst", "1mb", "latency", "50ms"], check=True)
        address = f"{lab.v4_prefix}.1"
        port = free_port()
        server = start_p2prc(root / "host", port, P2PRC_ADVERTISE_ADDRESSES=address,
                             P2PRC_SPEEDTEST_MAX_BYTES=str(max(size, 1 << 30)))
        iperf_port = free_port()
        ours, base = [], []
        for _ in range(args.rounds):
            out = friend.p2prc("speedtest", f"{address}:{port}", "--bytes", str(size),
                               "--download-only", "--json")
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            ours.append(float(json.loads(out.stdout)["transfers"][0]["mbit_per_second"]))
            base.append(iperf3_download(address, iperf_port, size,
                                        friend.command(), bind=address))
        report(f"Speed-test download over TLS vs iperf3 -R, {args.size} on a veth shaped to "
               f"{args.rate} (tbf)", "p2prc speedtest (TLS)", ours, "iperf3 -R", base,
               "Mbit/s", ">= 0.90")
    finally:
        if server is not None:
            stop(server)
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
