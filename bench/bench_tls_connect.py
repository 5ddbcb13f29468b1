"""What a new connection costs: time to the first byte of /v1/health over a new TLS 1.3
connection (handshake, node key checked) against a new plain-HTTP connection, the same
servers' settings, alternating in one run. No target: a figure to know. Discovery pays it
once per peer and exchange (its pages and latency probes share the connection).

Run: .venv/bin/python bench/bench_tls_connect.py [--connections 300]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import free_port, median, start_p2prc, stop

from p2prc_core.channel import Channel
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint

REQUEST = b"GET /v1/health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def first_byte_ms(channel: Channel) -> float:
    started = time.perf_counter()
    with channel.connect(5.0) as sock:
        sock.sendall(REQUEST)
        if not sock.recv(1):
            raise SystemExit("the server closed the connection without an answer")
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    tls_port, http_port = free_port(), free_port()
    secure = start_p2prc(root / "tls", tls_port, P2PRC_WORKERS="1")
    plain = start_p2prc(root / "http", http_port, P2PRC_WORKERS="1", P2PRC_TRANSPORT="http")
    node_id = NodeIdentity.load_or_create(root / "tls").node_id
    try:
        over_tls = Channel(Endpoint("127.0.0.1", tls_port, node_id), secure=True)
        over_http = Channel(Endpoint("127.0.0.1", http_port), secure=False)
        for _ in range(20):  # warm up
            first_byte_ms(over_tls)
            first_byte_ms(over_http)
        tls_ms, http_ms = [], []
        for _ in range(args.connections):
            tls_ms.append(first_byte_ms(over_tls))
            http_ms.append(first_byte_ms(over_http))
        print(f"\nNew connection to the first byte of GET /v1/health, {args.connections} each, "
              f"loopback")
        for label, values in (("TLS 1.3, node key checked", tls_ms),
                              ("plain HTTP", http_ms)):
            ordered = sorted(values)
            print(f"  {label:<28} median {median(values):6.2f} ms  p90 "
                  f"{ordered[int(len(ordered) * 0.9)]:6.2f} ms")
        print(f"  TLS costs {median(tls_ms) - median(http_ms):.2f} ms more per new connection "
              f"(ratio {median(tls_ms) / median(http_ms):.2f})")
    finally:
        stop(secure)
        stop(plain)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
