"""Through a relay against direct, to the same NATed node, on links shaped to 100 Mbit/s.

The lab is tests/natlab.py's: every namespace is linked only to others of the lab (no
traffic reaches the root namespace or beyond). On its "internet" bridge:

    home   -- router, NAT, port 8088 forwarded   11.0.0.1  --+
    natted -- router, NAT, nothing forwarded     11.0.0.2  --+
    relay: p2prc server, relay_open = true       11.0.0.10 --+-- internet bridge
    client: measures (this file, run again in    11.0.0.11 --+
            its namespace)

Shaped links: every link between the internet bridge and what hangs on it (both routers'
external links, the relay's and the client's) is shaped with tbf to ``--rate`` (100 Mbit/s)
in each direction: the qdisc of the veth end in the router's or host's namespace shapes
what it sends, and the qdisc of the bridge's end shapes what it receives. So each of them
has a 100 Mbit/s full-duplex access link, as a home line, a rented relay and a user would.
A download from home to the client crosses home's uplink and the client's downlink when
direct, and also the relay's downlink and uplink (opposite directions of one full-duplex
link) when relayed: both paths are limited to the same 100 Mbit/s. The links between the
homes and their routers are not shaped. The kernel has no netem, so no delay is added: the
latency figures are what the relay's processing adds, not a distance.

Measured, alternating relayed and direct where there are two sides:

1. Speed-test download (``PeerClient.download``, TLS end to end to home) of ``--size``
   through the relay against direct to home's forwarded port: the same node, the same
   server, the same client code. Target relayed/direct >= 0.8. The relay's, home's and the
   client's CPU time for each download is printed too (where the time goes).
2. From a NATed node's ``p2prc server`` process spawn to the first answer of
   ``GET /v1/health`` through the relay, a fresh node key each time (the client polls the
   relay before the spawn); ``--starts`` times for each kind of router: one that drops
   unsolicited connections (most home routers) and one that answers them with a reset.
   Then ``--starts`` restarts of one node (the same key, the previous process stopped
   just before, as ``systemctl restart`` would). Target <= 3 s. The points on the way are
   printed (reach.json first written, dial-back done, relay chosen, first wait open at the
   relay), and why any attempt failed.
3. Round trip of ``GET /v1/health`` on an open connection (median of ``--pings``) relayed
   against direct; and a new connection to the first answer, relayed against direct.
4. SSH through a tunnel against ssh to a published port is not measured: it needs the
   node to run Docker containers, whose published ports live in the root namespace, which
   this lab never links to. A note says so.

Needs root, ip, iptables, tc (tbf) and ss; iperf3 for the link check (optional).

Run: .venv/bin/python bench/bench_relay.py [--rounds 3] [--size 50M] [--rate 100mbit]
     [--pings 50] [--starts 3]
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
sys.path.insert(0, str(HERE.parent / "tests"))

PORT = 8088
IPERF_PORT = 5201
MAX_STARTS = 10  # bounds on the loops below, whatever the arguments say
MAX_ROUNDS = 20
MAX_PINGS = 1000
P2PRC = str(Path(sys.executable).with_name("p2prc"))


# -- the client's side: this file run again inside the client's namespace --------------------

def _endpoint(spec: dict[str, Any]) -> Any:
    from p2prc_core.models import Endpoint

    return Endpoint(spec["host"], spec["port"], spec["node"], False, spec.get("relay"))


def _cpu_self() -> float:
    usage = os.times()
    return usage.user + usage.system


def task_download(spec: dict[str, Any]) -> dict[str, Any]:
    from p2prc_core.client import PeerClient

    cpu = _cpu_self()
    with PeerClient([_endpoint(spec)], timeout=60) as client:
        done = client.download(spec["size"])
    return {"mbit": done.mbit_per_second, "seconds": done.seconds,
            "cpu": _cpu_self() - cpu}


def task_rtt(spec: dict[str, Any]) -> dict[str, Any]:
    """Round trips of /v1/health on one open connection, and new connections to the first
    answer."""
    from p2prc_core.client import PeerClient

    endpoint = _endpoint(spec)
    pings: list[float] = []
    with PeerClient([endpoint], timeout=10) as client:
        for _ in range(3):  # the connection is open, and warm, before the clock runs
            client.health()
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        for _ in range(spec["pings"]):
            started = time.perf_counter()
            client.health()
            pings.append((time.perf_counter() - started) * 1000)
        connections = len(pool.connections)  # still the one connection
    fresh: list[float] = []
    for _ in range(spec["connections"]):
        started = time.perf_counter()
        with PeerClient([endpoint], timeout=10) as client:
            client.health()
        fresh.append((time.perf_counter() - started) * 1000)
    return {"pings_ms": pings, "connections": connections, "new_ms": fresh}


def task_first(spec: dict[str, Any]) -> None:
    """Poll the node through the relay until it answers; write when (time.time()) to the
    result file. Writes the ready file first, so the server is spawned once this polls."""
    from p2prc_core.client import PeerClient
    from p2prc_core.errors import PeerError

    endpoint = _endpoint(spec)
    result = Path(spec["result"])
    Path(spec["ready"]).touch()
    deadline = time.monotonic() + spec["deadline"]
    attempts: list[str] = []
    while time.monotonic() < deadline and len(attempts) < 1000:
        try:
            with PeerClient([endpoint], timeout=spec["timeout"]) as client:
                client.health()
        except PeerError as err:
            attempts.append(str(err)[:160])
            time.sleep(0.02)
            continue
        result.write_text(json.dumps({"at": time.time(), "failed": len(attempts),
                                      "errors": sorted(set(attempts))[:5]}))
        return
    result.write_text(json.dumps({"at": None, "failed": len(attempts),
                                  "errors": sorted(set(attempts))[:5]}))


TASKS = {"download": task_download, "rtt": task_rtt, "first": task_first}


def client_task() -> None:
    spec = json.loads(sys.argv[2])
    answer = TASKS[spec["task"]](spec)
    if answer is not None:
        print(json.dumps(answer))


# -- the lab's side ---------------------------------------------------------------------------

def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def in_ns(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", namespace, *args, check=check)


def shape(namespace: str, device: str, rate: str) -> None:
    # burst: a few 64 KiB GSO packets (tbf splits any larger than the burst); latency: a
    # queue of 50 ms at most, as bench_speedtest_link.py.
    in_ns(namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
          "burst", "256kb", "latency", "50ms")


def shape_both_ways(lab: Any, namespace: str, inside: str, rate: str) -> list[str]:
    """Shape the link whose end in ``namespace`` is ``inside``: that end's qdisc shapes what
    the namespace sends, the bridge end's (same name, 'a' for 'b', see NatLab._veth) what it
    receives."""
    outside = inside[:-1] + "a"
    in_ns(lab.internet, "ip", "link", "show", "dev", outside)  # fails loudly if misnamed
    shape(namespace, inside, rate)
    shape(lab.internet, outside, rate)
    return [f"{namespace}:{inside}", f"{lab.internet}:{outside}"]


def add_public(lab: Any, name: str, rate: str) -> Any:
    host = lab.add_internet_host(name)
    inside = f"n{lab.tag}{lab.links}b"  # the link just made (NatLab._veth's names)
    shape_both_ways(lab, host.namespace, inside, rate)
    return host


def forward(router: Any, to: str, port: int) -> None:
    """A port forward on the router, as its owner would set one by hand (NatLab's FORWARD
    rules already let DNATed connections through)."""
    in_ns(router.namespace, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i",
          router.external_if, "-p", "tcp", "--dport", str(port), "-j", "DNAT",
          "--to-destination", f"{to}:{port}")


def stealth(router: Any, on: bool) -> None:
    """Drop (on) or answer with a reset (off: the lab's default) connections to the router
    itself that nobody inside asked for."""
    rule = ["INPUT", "-i", router.external_if, "-p", "tcp", "-m", "conntrack", "--ctstate",
            "NEW", "-j", "DROP"]
    present = in_ns(router.namespace, "iptables", "-w", "-C", *rule, check=False).returncode == 0
    if on and not present:
        in_ns(router.namespace, "iptables", "-w", "-A", *rule)
    elif not on and present:
        in_ns(router.namespace, "iptables", "-w", "-D", *rule)


def node_id(host: Any, home: Path | None = None) -> str:
    env = {"P2PRC_HOME": str(home)} if home else {}
    out = host.p2prc("id", **env)
    if out.returncode != 0:
        raise SystemExit(f"p2prc id failed in {host.name}: {out.stderr}")
    return out.stdout.strip().splitlines()[0]


def client_run(client: Any, spec: dict[str, Any], timeout: float = 180,
               script: str = __file__) -> dict[str, Any]:
    """``script --task SPEC`` run in ``client``'s namespace; the JSON it printed last."""
    out = subprocess.run(client.command(sys.executable, str(Path(script).resolve()),
                                        "--task", json.dumps(spec)),
                         capture_output=True, text=True, timeout=timeout, env=client.env())
    if out.returncode != 0:
        raise SystemExit(f"client task {spec['task']} failed:\n{out.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return answer


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants now alive."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def wait_file(pattern_dir: Path, pattern: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not any(pattern_dir.glob(pattern)):
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def fmt(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:,.{digits}f}" for v in values)


# -- 1. speed test ----------------------------------------------------------------------------

def bench_download(args: Any, client: Any, relayed: dict[str, Any], direct: dict[str, Any],
                   pids: dict[str, int], size: int) -> None:
    results: dict[str, list[float]] = {"relayed": [], "direct": []}
    cpu: dict[str, dict[str, list[float]]] = {k: {"relay": [], "home": [], "client": []}
                                              for k in results}
    for index in range(min(args.rounds, MAX_ROUNDS)):
        order = [("relayed", relayed), ("direct", direct)]
        if index % 2:
            order.reverse()
        for name, spec in order:
            before = {k: tree_cpu(pid) for k, pid in pids.items()}
            answer = client_run(client, {**spec, "task": "download", "size": size})
            results[name].append(answer["mbit"])
            for k, pid in pids.items():
                cpu[name][k].append(tree_cpu(pid) - before[k])
            cpu[name]["client"].append(answer["cpu"])
    ratio = statistics.median(results["relayed"]) / statistics.median(results["direct"])
    print(f"\n1. Speed-test download (TLS to home), {args.size}, every internet link shaped "
          f"to {args.rate} (tbf)")
    for name in ("relayed", "direct"):
        print(f"  {name + ' (' + ('via relay' if name == 'relayed' else 'port forward') + ')':<28}"
              f" median {statistics.median(results[name]):>8,.1f} Mbit/s  runs "
              f"{fmt(results[name])}")
    print(f"  ratio relayed/direct {ratio:.2f} (target >= 0.80)")
    for name in ("relayed", "direct"):
        parts = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in cpu[name].items())
        print(f"  CPU seconds per download, {name:<8} (median): {parts}")


# -- 2. start to first relayed answer ---------------------------------------------------------

def one_start(args: Any, natted: Any, client: Any, relay: Any, relay_at: str,
              relay_spec: dict[str, Any], home: Path, node: str, run_dir: Path
              ) -> dict[str, Any]:
    """Spawn home's server (its key at ``home``, id ``node``) while the client already polls
    it through the relay; seconds from the spawn to the first answer, and the points on the
    way. The server is stopped again before this returns."""
    run_dir.mkdir()
    relay_dir = relay.home / "relay"
    before = {m.name for m in relay_dir.glob(f"w.{node}.*")}  # a stopped run's, if any
    ready, result = run_dir / "client.ready", run_dir / "client.json"
    # The client's timeout is p2prc's default request_timeout (10 s), as a user's would be.
    spec = {**relay_spec, "task": "first", "node": node, "ready": str(ready),
            "result": str(result), "deadline": args.start_deadline, "timeout": 10}
    poller = client.spawn(sys.executable, str(Path(__file__).resolve()), "--task",
                          json.dumps(spec), log=f"first-{run_dir.name}.log")
    server = None
    try:
        wait_file(run_dir, "client.ready", 30, "the client polls")
        time.sleep(0.3)  # its first attempt is out, at the relay
        marks: dict[str, float] = {}
        reach = home / "reach.json"
        spawned = time.time()
        server = natted.spawn(P2PRC, "server", "--port", str(PORT),
                              log=f"server-{run_dir.name}.log", P2PRC_HOME=str(home),
                              P2PRC_USE_RELAY="always", P2PRC_RELAYS=relay_at,
                              P2PRC_ACCESS_LOG="false")
        deadline = time.monotonic() + args.start_deadline + 15
        while not result.exists() and time.monotonic() < deadline and server.poll() is None:
            now = time.time()
            try:
                if "reach.json" not in marks and reach.stat().st_mtime > spawned:
                    marks["reach.json"] = now
                state = json.loads(reach.read_text())
            except (OSError, ValueError):
                state = {}
            # The agent's own clock readings, where it writes them.
            checked = (state.get("reachable") or {}).get("checked") or 0
            if "dial-back" not in marks and checked > spawned:
                marks["dial-back"] = checked
            if "relay" not in marks and state.get("relay") and \
                    (state.get("relay_since") or 0) > spawned:
                marks["relay"] = state["relay_since"]
            if "wait at relay" not in marks and \
                    {m.name for m in relay_dir.glob(f"w.{node}.*")} - before:
                marks["wait at relay"] = now
            time.sleep(0.01)
        if poller.poll() is None:
            poller.wait(30)
        answer = json.loads(result.read_text()) if result.exists() else {"at": None}
    finally:
        if server is not None:
            natted.stop(server)
        natted.stop(poller)
    if answer["at"] is None:
        log = (natted.home / f"server-{run_dir.name}.log").read_text(errors="replace")
        raise SystemExit(f"no answer through the relay within {args.start_deadline:g} s "
                         f"({run_dir.name}): {answer}\n{log[-2000:]}")
    return {"seconds": answer["at"] - spawned, "failed": answer["failed"],
            "errors": answer["errors"], "stale": len(before),
            "marks": {k: v - spawned for k, v in marks.items()}}


def print_starts(what: str, runs: list[dict[str, Any]]) -> None:
    seconds = [r["seconds"] for r in runs]
    print(f"  {what}: median {statistics.median(seconds):.2f} s  runs {fmt(seconds, 2)}")
    for r in runs:
        marks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["marks"].items(),
                                                               key=lambda kv: kv[1]))
        line = f"    {r['seconds']:.2f} s: {marks or 'no marks'} (s after spawn)"
        if r["stale"]:
            line += f"; {r['stale']} wait(s) of the stopped process still at the relay"
        if r["failed"]:
            line += f"; {r['failed']} failed attempt(s): {r['errors'][0]}"
        print(line)


def bench_start(args: Any, lab: Any, natted: Any, client: Any, relay: Any, relay_at: str,
                relay_spec: dict[str, Any]) -> None:
    router = lab.routers[natted.name]
    starts = min(args.starts, MAX_STARTS)
    print("\n2. Server spawn to the first answer through the relay (a NATed node; the client "
          "polls\n   the relay from before the spawn, 10 s timeout; target <= 3 s)")
    for label, drops in (("drops", True), ("resets", False)):
        stealth(router, drops)
        runs = []
        for index in range(starts):
            home = natted.home / f"{label}-{index}"
            home.mkdir()
            node = node_id(natted, home)  # a fresh key: no earlier wait at the relay
            runs.append(one_start(args, natted, client, relay, relay_at, relay_spec, home,
                                  node, home / "run"))
        print_starts("a new node, router drops unsolicited connections" if drops else
                     "a new node, router answers them with a reset", runs)
    # A restart: the same key, the previous process stopped just before (systemctl
    # restart). Its last wait may still be open at the relay.
    stealth(router, True)
    home = natted.home / "restart"
    home.mkdir()
    node = node_id(natted, home)
    one_start(args, natted, client, relay, relay_at, relay_spec, home, node,
              natted.home / "restart-first")  # the first start, not timed
    runs = [one_start(args, natted, client, relay, relay_at, relay_spec, home, node,
                      natted.home / f"restart-{index}") for index in range(starts)]
    print_starts("the same node restarted, router drops unsolicited connections", runs)


# -- 3. latency -------------------------------------------------------------------------------

def bench_latency(args: Any, client: Any, relayed: dict[str, Any],
                  direct: dict[str, Any]) -> None:
    pings: dict[str, list[float]] = {"relayed": [], "direct": []}
    fresh: dict[str, list[float]] = {"relayed": [], "direct": []}
    connections: dict[str, set[int]] = {"relayed": set(), "direct": set()}
    rounds = min(args.rounds, MAX_ROUNDS)
    per_round = -(-min(args.pings, MAX_PINGS) // rounds)  # about --pings in all
    for index in range(rounds):
        order = [("relayed", relayed), ("direct", direct)]
        if index % 2:
            order.reverse()
        for name, spec in order:
            answer = client_run(client, {**spec, "task": "rtt", "pings": per_round,
                                         "connections": 5})
            pings[name] += answer["pings_ms"]
            fresh[name] += answer["new_ms"]
            connections[name].add(answer["connections"])
    print("\n3. Latency (no delay on the links: what the relay's processing adds)")
    for title, data in ((f"GET /v1/health on an open connection, {rounds} x {per_round}",
                         pings),
                        (f"a new connection (TLS; through the relay: relay, token, node's "
                         f"accept, TLS to home) to the first answer, {rounds} x 5", fresh)):
        relay_ms, direct_ms = (statistics.median(data[k]) for k in ("relayed", "direct"))
        print(f"  {title}")
        for name in ("relayed", "direct"):
            values = sorted(data[name])
            p90 = values[int(0.9 * (len(values) - 1))]
            slow = sum(v > 20 for v in values)
            print(f"    {name:<8} median {statistics.median(values):7.2f} ms  p90 {p90:7.2f} ms"
                  f"  min {values[0]:6.2f} ms  over 20 ms: {slow} of {len(values)}")
        print(f"    ratio relayed/direct {relay_ms / direct_ms:.2f}; the relay adds "
              f"{relay_ms - direct_ms:+.2f} ms")
    if connections["relayed"] != {1} or connections["direct"] != {1}:
        print(f"  note: the pings did not stay on one connection: {connections}")


# -- the lab ----------------------------------------------------------------------------------

def link_check(lab: Any, client: Any, size: int) -> float | None:
    """iperf3 -R from home (through the forward) to the client: what the shaped path
    carries with no p2prc in it."""
    if shutil.which("iperf3") is None:
        return None
    server = lab.home.spawn("iperf3", "-s", "-1", "-p", str(IPERF_PORT), log="iperf3.log")
    try:
        lab.wait_listening(lab.home, IPERF_PORT)
        out = subprocess.run(client.command("iperf3", "-c", lab.router.external_ip, "-p",
                                            str(IPERF_PORT), "-R", "-n", str(size), "-J"),
                             capture_output=True, text=True, timeout=120)
        data = json.loads(out.stdout or "{}")
        if "error" in data or out.returncode != 0:
            print(f"  iperf3 failed: {data.get('error') or out.stderr}")
            return None
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        lab.home.stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="50M")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--start-deadline", type=float, default=30.0,
                        help="give up on a start after this many seconds")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.starts < 1 or args.pings < 1:
        raise SystemExit("--rounds, --starts and --pings are at least 1")

    from natlab import NatLab, missing
    from netlab import available

    from p2prc_core.models import parse_size

    size = parse_size(args.size)
    reason = available() or missing() or (None if shutil.which("tc") else "tc is missing")
    if reason:
        raise SystemExit(reason)
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-relay-"))
    lab = None
    try:
        lab = NatLab(root / "lab", upnp=False)
        shape_both_ways(lab, lab.router.namespace, lab.router.external_if, args.rate)
        natted = lab.add_home("natted")
        shape_both_ways(lab, lab.routers["natted"].namespace,
                        lab.routers["natted"].external_if, args.rate)
        relay = add_public(lab, "relay", args.rate)
        client = add_public(lab, "client", args.rate)
        forward(lab.router, str(lab.home.ipv4), PORT)
        forward(lab.router, str(lab.home.ipv4), IPERF_PORT)
        stealth(lab.router, True)
        stealth(lab.routers["natted"], True)

        relay_id = node_id(relay)
        relay_proc = relay.serve(port=PORT, P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true",
                                 P2PRC_ACCESS_LOG="false")
        lab.wait_listening(relay, PORT)
        relay_at = f"{relay_id}@{relay.ipv4}:{PORT}"
        home_id = node_id(lab.home)
        home_proc = lab.home.serve(port=PORT, P2PRC_USE_RELAY="always", P2PRC_RELAYS=relay_at,
                                   P2PRC_ACCESS_LOG="false",
                                   P2PRC_SPEEDTEST_MAX_BYTES=str(max(size, 1 << 30)))
        lab.wait_listening(lab.home, PORT)
        wait_file(relay.home / "relay", f"w.{home_id}.*", 30, "home waits at the relay")

        relayed = {"host": relay.ipv4, "port": PORT, "node": home_id, "relay": relay_id}
        direct = {"host": lab.router.external_ip, "port": PORT, "node": home_id}
        print(f"Lab: home {home_id[:8]} behind NAT at {lab.router.external_ip} (port {PORT} "
              f"forwarded), relay {relay_id[:8]} at {relay.ipv4}, client at {client.ipv4}; "
              f"{os.cpu_count()} CPUs; links to the internet bridge shaped to {args.rate} "
              f"each way")
        ceiling = link_check(lab, client, size)
        if ceiling is not None:
            print(f"  link check: iperf3 -R home -> client, direct, {args.size}: "
                  f"{ceiling:,.1f} Mbit/s")

        bench_download(args, client, relayed, direct,
                       {"relay": relay_proc.pid, "home": home_proc.pid}, size)
        bench_latency(args, client, relayed, direct)
        bench_start(args, lab, natted, client, relay, relay_at,
                    {"host": relay.ipv4, "port": PORT, "relay": relay_id})
        print("\n4. SSH through a tunnel vs ssh to a published port: not measured here. A "
              "tunnel ends at a\n   container's published port on the node's host, and Docker "
              "publishes ports in the\n   root namespace, which this lab never links to "
              "(bench/bench_touch.py times ssh to a\n   container without the relay).")
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--task":
        client_task()
    else:
        main()
