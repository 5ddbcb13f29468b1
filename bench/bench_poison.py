"""Table poisoning, measured: what one source can push into a node's table in 10 s, how
long an update takes with 16 peers that accept connections and never answer, and /v1/health
latency while 16 clients read /v1/peers from a full table (against the same with no load).

Run: .venv/bin/python bench/bench_poison.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import P2PRC, free_port, start_p2prc, stop

from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.records import sign_record
from p2prc_core.tls import client_context


def junk(count: int, tag: str) -> list[dict]:
    return [sign_record(NodeIdentity.generate(), {
        "name": f"junk-{tag}-{i}", "addresses": [f"2001:db8:{tag}::{i:x}"], "port": 8088,
        "seq": 1, "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})
        for i in range(count)]


def flood(root: Path, seconds: float) -> None:
    port = free_port()
    server = start_p2prc(root / "flooded", port)
    batches = [junk(100, f"{b:x}") for b in range(40)]  # made before the clock starts
    try:
        sent = 0
        with httpx.Client(verify=client_context(), base_url=f"https://127.0.0.1:{port}") as web:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and batches:
                web.post("/v1/peers", json={"records": batches.pop()}, timeout=10)
                sent += 100
        held = len(PeerTable(root / "flooded").load())
        print(f"\nOne source floods POST /v1/peers for {seconds:g} s: sent {sent:,} fresh "
              f"signed records, the table took {held} (exchange_newcomers_per_minute = 60)")
    finally:
        stop(server)


def tarpit_update(root: Path) -> None:
    tarpit = socket.create_server(("0.0.0.0", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(tarpit.accept()[0]) for _ in iter(int, 1)],
                     daemon=True).start()
    me = root / "me"
    table = PeerTable(me, NodeIdentity.load_or_create(me).node_id, allow_loopback=True)
    table.merge([sign_record(NodeIdentity.generate(), {
        "name": f"tarpit{i}", "addresses": [f"127.0.0.{a}" for a in range(2, 10)],
        "port": tarpit.getsockname()[1], "seq": 1, "time": int(time.time()), "specs": {},
        "metadata": {}, "version": "x"}) for i in range(16)])
    started = time.monotonic()
    out = subprocess.run([P2PRC, "peers", "update", "--json"], capture_output=True, text=True,
                         env={**os.environ, "P2PRC_HOME": str(me),
                              "P2PRC_ALLOW_LOOPBACK": "true"})
    took = time.monotonic() - started
    failed = len(json.loads(out.stdout)["failed"])
    print(f"\npeers update with 16 peers of 8 addresses each that accept and never answer "
          f"(defaults: request_timeout 10 s, peer_time_budget 15 s): {took:.1f} s, "
          f"{failed} failed")
    tarpit.shutdown(socket.SHUT_RDWR)
    tarpit.close()
    for conn in held:
        conn.close()


def health_under_load(root: Path, seconds: float) -> None:
    home = root / "full"
    table = PeerTable(home, NodeIdentity.load_or_create(home).node_id, max_peers=5000,
                      max_unverified=5000)
    for batch in range(50):
        table.merge(junk(100, f"f{batch:x}"))
    port = free_port()
    server = start_p2prc(home, port)
    base = f"https://127.0.0.1:{port}"
    try:
        def latencies(window: float) -> list[float]:
            found = []
            with httpx.Client(verify=client_context(), base_url=base) as web:
                end = time.monotonic() + window
                while time.monotonic() < end:
                    started = time.perf_counter()
                    web.get("/v1/health", timeout=30)
                    found.append((time.perf_counter() - started) * 1000)
                    time.sleep(0.05)
            return found

        quiet = latencies(seconds / 2)
        stopping = threading.Event()
        fetched = [0]

        def reader() -> None:
            with httpx.Client(verify=client_context(), base_url=base) as web:
                while not stopping.is_set():
                    web.get("/v1/peers", timeout=60)
                    fetched[0] += 1

        readers = [threading.Thread(target=reader, daemon=True) for _ in range(16)]
        for thread in readers:
            thread.start()
        loaded = latencies(seconds)
        stopping.set()
        for thread in readers:
            thread.join(60)
        print(f"\n/v1/health while 16 clients read /v1/peers from a table of "
              f"{len(table.load()):,} peers ({fetched[0] / seconds:.0f} reads/s):")
        for label, values in (("no load", quiet), ("16 readers", loaded)):
            ordered = sorted(values)
            print(f"  {label:<12} median {statistics.median(values):7.1f} ms  p90 "
                  f"{ordered[int(len(ordered) * 0.9)]:7.1f} ms  ({len(values)} requests)")
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    try:
        flood(root, args.seconds)
        tarpit_update(root)
        health_under_load(root, args.seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
