"""One relay holding many: waiting nodes and relayed streams, with the relay's own health
answers timed meanwhile. A real ``p2prc server`` (relay = true, relay_open, 2 workers) on
loopback; this process plays every node and client, over real TLS with signed requests.

1. ``--nodes`` nodes listen at the relay (``POST /v1/relay/listen``, one connection each),
   nodes the relay trusts (a relay for friends; ``--strangers``: any key, as relay_open
   allows, which may take half the places);
2. ``--streams`` of them get a client each, from as many source addresses of loopback (so
   that the per-key and per-network limits are kept, not raised): connect, the token on the
   node's stream, the node's accept, and 1 KiB each way through every stream;
3. meanwhile, and before as a baseline on the same relay, ``GET /v1/health`` on a kept-alive
   connection, ``--pings`` times: the median and the 99th percentile;
4. threads and resident memory of the relay's processes, before and with the load.

Goals (issue 25): 1,000 waiting nodes and 500 streams on a 2-core machine, /v1/health p99
under 50 ms meanwhile.

Run: .venv/bin/python bench/bench_relay_load.py [--nodes 1000] [--streams 500] [--pings 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from common import free_port, start_p2prc, stop

from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.relay_client import Tokens, open_accept, open_listen
from p2prc_core.signing import sign_request
from p2prc_core.tls import client_context
from p2prc_core.trust import TrustStore
from p2prc_core.upgrade_client import request_bytes


def pings(url: str, count: int) -> tuple[float, float]:
    took = []
    with httpx.Client(verify=client_context(), timeout=10) as client:
        client.get(url)
        for _ in range(count):
            started = time.perf_counter()
            client.get(url).raise_for_status()
            took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.99))]


def usage(pid: int) -> tuple[int, float]:
    """Threads and resident MB of the server's processes."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return (sum(p.num_threads() for p in procs),
            sum(p.memory_info().rss for p in procs) / 1e6)


def source(index: int) -> str:
    """A loopback address for each client, four to a /24 (the relay counts an IPv4 /24 as
    one network and allows it 4 streams; each key 3): the limits are kept, not raised."""
    return f"127.{10 + index // 1000}.{(index // 4) % 250 + 1}.{index % 4 + 1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--strangers", action="store_true",
                        help="nodes the relay does not trust (relay_open): they may take half "
                             "of relay_max_nodes, per worker")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2prc-relay-load-") as where:
        home = Path(where) / "relay"
        nodes = [NodeIdentity.generate() for _ in range(args.nodes)]
        if not args.strangers:  # a relay for friends: it trusts the nodes that wait there
            trust = TrustStore(home)
            for node in nodes:
                trust.add(node.node_id)
        port = free_port()
        proc = start_p2prc(home, port, P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true",
                           P2PRC_WORKERS="2", P2PRC_ALLOW_LOOPBACK="true", P2PRC_UPNP="false",
                           P2PRC_RELAY_POLLS_PER_NETWORK=str(args.nodes),
                           P2PRC_ADVERTISE_ADDRESSES="127.0.0.1")
        relay = Endpoint("127.0.0.1", port, NodeIdentity.load_or_create(home).node_id)
        url = f"https://127.0.0.1:{port}/v1/health"
        listening: list[Tokens] = []
        streams = []
        try:
            idle = pings(url, args.pings)
            threads0, rss0 = usage(proc.pid)
            started = time.monotonic()
            for node in nodes:
                listening.append(open_listen(relay, node, True, 10))
            listen_took = time.monotonic() - started
            print(f"{args.nodes} nodes listening after {listen_took:.1f} s", file=sys.stderr)
            threads1, rss1 = usage(proc.pid)
            started = time.monotonic()
            for index in range(args.streams):
                client, _ = _connect(relay, nodes[index], index)
                token = None
                while token is None:
                    token = listening[index].next(5.0)
                node_side = open_accept(relay, token, nodes[index], True, 10)
                _switched(client)
                streams.append((client, node_side))
            for client, node_side in streams:
                client.sendall(os.urandom(1024))
                node_side.sendall(os.urandom(1024))
            for client, node_side in streams:
                for sock in (client, node_side):
                    got = b""
                    while len(got) < 1024:
                        got += sock.recv(4096)
            streams_took = time.monotonic() - started
            print(f"{len(streams)} streams open after {streams_took:.1f} s", file=sys.stderr)
            loaded = pings(url, args.pings)
            threads2, rss2 = usage(proc.pid)
        finally:
            for tokens in listening:
                tokens.close()
            for pair in streams:
                for sock in pair:
                    sock.close()
            stop(proc)
    print(f"\nrelay: 2 workers, {os.cpu_count()} CPUs; {args.nodes} nodes listening, "
          f"{len(streams)} relayed streams open\n")
    print(f"{'':>34} {'idle':>10} {'loaded':>10}")
    print(f"{'/v1/health median':>34} {idle[0]:>8.2f}ms {loaded[0]:>8.2f}ms")
    print(f"{'/v1/health p99':>34} {idle[1]:>8.2f}ms {loaded[1]:>8.2f}ms   goal < 50 ms")
    print(f"{'threads (all processes)':>34} {threads0:>10} {threads2:>10}")
    print(f"{'resident memory (all processes)':>34} {rss0:>8.0f}MB {rss2:>8.0f}MB")
    print(f"\nmemory per waiting node: {(rss1 - rss0) * 1e3 / args.nodes:.1f} KB; "
          f"threads with the nodes alone: {threads1}; "
          f"per stream, with both its ends: {(rss2 - rss1) * 1e3 / max(1, len(streams)):.1f} "
          f"KB")
    print(f"{args.nodes} listens in {listen_took:.1f} s; {len(streams)} streams set up in "
          f"{streams_took:.1f} s (one at a time, from this one process)")


def _connect(relay: Endpoint, node: NodeIdentity, index: int) -> tuple[ssl.SSLSocket, str]:
    """A client's signed connect to ``node`` from a source address of its own, sent: the
    relay answers 101 once the node accepted (``_switched``)."""
    raw = socket.create_connection((relay.host, relay.port), timeout=30,
                                   source_address=(source(index), 0))
    sock = client_context().wrap_socket(raw)
    path, query = "/v1/relay/connect", f"node={node.node_id}"
    headers = sign_request(NodeIdentity.generate(), "POST", path, query, b"",
                           relay.node_id or "")
    sock.sendall(request_bytes(f"{path}?{query}", relay.address, headers))
    return sock, path


def _switched(sock: ssl.SSLSocket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("the relay closed a client's connect")
        data += chunk
    if not data.startswith(b"HTTP/1.1 101"):
        first = data.split(b"\r\n", 1)[0]
        raise SystemExit(f"a connect was answered {first!r}")


if __name__ == "__main__":
    main()
