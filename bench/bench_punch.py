"""Punched paths (issue 24): the NAT lab's matrix, and QUIC on a punched path against TCP+TLS.

The lab is tests/natlab.py's: every namespace is linked only to others of the lab.

    home   -- router (NAT of kind A)   11.0.0.1 --+
    friend -- router (NAT of kind B)   11.0.0.2 --+-- internet bridge
    relay: p2prc server, relay_open   11.0.0.10 --+
    (friend "none": friend itself at 11.0.0.x, no router)

Measured:

1. The matrix: for each pair of NAT kinds (home: cone, symmetric, udp-dropped; friend: none,
   cone, symmetric, udp-dropped), ``--tries`` tries from friend, each a fresh process with
   a node key of its own that home trusts (no memory of earlier tries): punched or not,
   and the time from the first packet of the try (the UDP probe of the relay) to the first
   answer over the punched path (``GET /v1/health``), or to giving up. Goals: every cone/cone and
   cone/none try; symmetric against cone in at least 90%; the others give up in 3 s.
2. Throughput of a speed-test download (TLS to home inside each stream, as every client
   does) over punched QUIC against TCP+TLS direct to home's port, forwarded on its router
   for this, between the same namespaces; on links shaped to ``--rate`` with tbf (both
   routers' external links, each way), then unshaped, with the client's CPU time per Gbit.
   Goal: punched/direct >= 0.9 on the shaped link.
3. What the relay's namespace sent and received while friend downloaded ``--size`` over
   the punched path, punch included. Goal: under 1% of the transfer.

``p2prc ssh CONTAINER -- true`` through a punched path against the relay is timed by
bench/bench_tunnel_ssh.py --punched (a container's published port lives in the root
namespace, which this lab never links to).

Needs root, ip, iptables and tc (tbf).

Run: .venv/bin/python bench/bench_punch.py [--tries 20] [--size 100M] [--rate 100mbit]
     [--pairs cone/cone,symmetric/cone] [--skip-matrix] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_relay import (  # noqa: E402 - after the path above
    PORT,
    client_run,
    forward,
    node_id,
    shape_both_ways,
    wait_file,
)

HOME_KINDS = ("cone", "symmetric", "udp-dropped")
FRIEND_KINDS = ("none", "cone", "symmetric", "udp-dropped")
MAX_TRIES = 100


# -- friend's side: this file run again in friend's namespace --------------------------------

def task_try(spec: dict[str, Any]) -> dict[str, Any]:
    """One try, as a new client would make it: punched or not, how long, and why not."""
    from p2prc_core.client import PeerClient
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.models import Endpoint
    from p2prc_core.punched import PunchedPaths

    endpoint = Endpoint(spec["relay_host"], PORT, spec["node"], False, spec["relay"])
    paths = PunchedPaths(None, NodeIdentity.load_or_create(Path(spec["key"])))
    started = time.monotonic()
    sock = paths.socket_to(endpoint)
    if sock is None:
        took = time.monotonic() - started
        paths.close()
        return {"punched": False, "seconds": took, "why": paths.last_error}
    sock.close()
    with PeerClient([endpoint], timeout=10, paths=paths) as client:
        client.health()  # over the link just punched
    took = time.monotonic() - started
    paths.close()
    return {"punched": True, "seconds": took, "why": ""}


def task_download(spec: dict[str, Any]) -> dict[str, Any]:
    from p2prc_core.client import PeerClient
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.models import Endpoint
    from p2prc_core.punched import PunchedPaths

    identity = NodeIdentity.generate()
    if spec["punched"]:
        endpoint = Endpoint(spec["relay_host"], PORT, spec["node"], False, spec["relay"])
        paths = PunchedPaths(None, identity)
        if paths.socket_to(endpoint) is None:
            raise SystemExit("the punch failed")
    else:
        endpoint, paths = Endpoint(spec["direct"], PORT, spec["node"]), None
    with PeerClient([endpoint], timeout=120, identity=identity, paths=paths) as client:
        client.health()  # the connection stands before the clock runs
        cpu = sum(os.times()[:2])
        done = client.download(spec["size"])
        cpu = sum(os.times()[:2]) - cpu
    if paths is not None:
        paths.close()
    return {"mbit": done.mbit_per_second, "seconds": done.seconds, "cpu": cpu}


TASKS = {"try": task_try, "download": task_download}


# -- the lab's side ---------------------------------------------------------------------------

def in_ns(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", namespace, *args], capture_output=True,
                          text=True, check=True, timeout=60)


def friend_run(friend: Any, spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    return client_run(friend, spec, timeout, script=__file__)


def namespace_bytes(namespace: str) -> int:
    links = json.loads(in_ns(namespace, "ip", "-s", "-j", "link", "show").stdout)
    return sum(link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
               for link in links if link["ifname"] != "lo")


class Lab:
    """home behind a NAT of one kind, friend behind another (or none), a public relay; home
    waits at the relay."""

    def __init__(self, root: Path, home_nat: str, friend_nat: str, size: int):
        from natlab import NatLab

        self.lab = NatLab(root, nat=home_nat)
        try:
            self.friend = self.lab.add_internet_host("friend") if friend_nat == "none" \
                else self.lab.add_home("friend", nat=friend_nat)
            self.relay = self.lab.add_internet_host("relay")
            self.relay_id = node_id(self.relay)
            self.relay.serve(port=PORT, P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true",
                             P2PRC_ACCESS_LOG="false")
            self.lab.wait_listening(self.relay, PORT)
            self.home_id = node_id(self.lab.home)
            self.lab.home.serve(port=PORT, P2PRC_USE_RELAY="always", P2PRC_ACCESS_LOG="false",
                                P2PRC_RELAYS=f"{self.relay_id}@{self.relay.ipv4}:{PORT}",
                                P2PRC_SPEEDTEST_MAX_BYTES=str(max(size, 1 << 30)))
            self.lab.wait_listening(self.lab.home, PORT)
            wait_file(self.relay.home / "relay", f"w.{self.home_id}.*", 30,
                      "home waits at the relay")
        except BaseException:
            self.lab.close()
            raise

    def spec(self, task: str, **more: Any) -> dict[str, Any]:
        return {"task": task, "relay_host": self.relay.ipv4, "relay": self.relay_id,
                "node": self.home_id, "direct": self.lab.router_external_ip, **more}

    def close(self) -> None:
        self.lab.close()


def trust_all(home: Path, keys: list[Path]) -> None:
    """A node key in each of ``keys`` (folders), each trusted by the node at ``home``."""
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.trust import TrustStore

    for key in keys:
        key.mkdir(parents=True, exist_ok=True)
        TrustStore(home).add(NodeIdentity.load_or_create(key).node_id, key.name)


def bench_matrix(root: Path, pairs: list[tuple[str, str]], tries: int) -> None:
    print(f"\n1. The matrix: {tries} tries per pair, each a new client with a key of its own "
          f"(trusted by home)")
    print(f"  {'home/friend':<24} {'punched':>9} {'median s':>9} {'max s':>7}  "
          f"why not (the first)")
    for home_nat, friend_nat in pairs:
        lab = Lab(root / f"m-{home_nat}-{friend_nat}", home_nat, friend_nat, 1 << 20)
        try:
            keys = [lab.friend.home / f"key{i}" for i in range(min(tries, MAX_TRIES))]
            trust_all(lab.lab.home.home, keys)  # friends: a host spreads for friends only
            results = [friend_run(lab.friend, lab.spec("try", key=str(key))) for key in keys]
        finally:
            lab.close()
        won = [r for r in results if r["punched"]]
        times = [r["seconds"] for r in (won or results)]
        why = next((r["why"] for r in results if not r["punched"]), "")
        print(f"  {home_nat + '/' + friend_nat:<24} {len(won):>3} of {len(results):<3}"
              f" {statistics.median(times):9.2f} {max(times):7.2f}  {why[:70]}")


def bench_throughput(root: Path, size: int, rate: str) -> None:
    lab = Lab(root / "throughput", "cone", "cone", size)
    try:
        forward(lab.lab.router, str(lab.lab.home.ipv4), PORT)  # the direct baseline's way in
        for shaped in (False, True):  # unshaped first: a qdisc, once added, stays
            if shaped:
                for router in lab.lab.routers.values():
                    shape_both_ways(lab.lab, router.namespace, router.external_if, rate)
            label = f"links shaped to {rate}" if shaped else "unshaped veth"
            figures: dict[str, list[dict[str, Any]]] = {"punched": [], "direct": []}
            for index in range(3):
                order = ["punched", "direct"] if index % 2 == 0 else ["direct", "punched"]
                for name in order:
                    before = namespace_bytes(lab.relay.namespace)
                    answer = friend_run(lab.friend, lab.spec("download", size=size,
                                                             punched=name == "punched"))
                    answer["relay_bytes"] = namespace_bytes(lab.relay.namespace) - before
                    figures[name].append(answer)
            punched = statistics.median(r["mbit"] for r in figures["punched"])
            direct = statistics.median(r["mbit"] for r in figures["direct"])
            print(f"\n2. Download of {size >> 20} MiB, {label}, 3 rounds each, alternating")
            for name in ("punched", "direct"):
                rows = figures[name]
                cpu = statistics.median(r["cpu"] / (r["mbit"] * r["seconds"] / 1000)
                                        for r in rows)
                speeds = ", ".join(f"{r['mbit']:,.0f}" for r in rows)
                print(f"  {name:<8} {speeds} Mbit/s; friend's CPU {cpu:.2f} s per Gbit")
            print(f"  ratio punched/direct {punched / direct:.2f}")
            if shaped:
                carried = statistics.median(r["relay_bytes"] for r in figures["punched"])
                print(f"\n3. The relay's bytes while friend punched and downloaded "
                      f"{size >> 20} MiB: {carried:,.0f} ({100 * carried / size:.3f}% of the "
                      f"transfer)")
    finally:
        lab.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--size", default="100M")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--pairs", default="", help="home/friend,... (default: all 12)")
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from natlab import missing
    from netlab import available

    from p2prc_core.models import parse_size

    reason = available() or missing() or (None if shutil.which("tc") else "tc is missing")
    if reason:
        raise SystemExit(reason)
    pairs = [tuple(p.split("/", 1)) for p in args.pairs.split(",") if p] or \
        [(h, f) for h in HOME_KINDS for f in FRIEND_KINDS]
    for home_nat, friend_nat in pairs:
        if home_nat not in HOME_KINDS or friend_nat not in FRIEND_KINDS:
            raise SystemExit(f"--pairs: home is one of {HOME_KINDS}, friend of {FRIEND_KINDS}")
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-punch-"))
    print(f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    try:
        if not args.skip_matrix:
            bench_matrix(root, pairs, args.tries)  # type: ignore[arg-type]
        if not args.skip_throughput:
            bench_throughput(root, parse_size(args.size), args.rate)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--task":
        print(json.dumps(TASKS[json.loads(sys.argv[2])["task"]](json.loads(sys.argv[2]))))
    else:
        main()
