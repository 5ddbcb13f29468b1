"""``ssh CONTAINER -- true`` to a host met through its relay: over a punched path (QUIC, the
node's punch coordinated through the relay) against through the relay, on one machine.

The host advertises a port where nothing listens, so a direct dial is refused at once and
the relay is the way in (as tests/test_exec_relay.py). Each first connection starts a new
tunnel helper (OpenSSH's ProxyCommand), so the punched one pays a whole try each time: its
UDP probe of the relay, the offer through the relay, the punch and QUIC's handshake. A
reused connection (ControlMaster) is the same either way. Then ``cat`` of ``--size`` through
one session, each way. Everything is on loopback, where the relay costs almost nothing: what
this shows is what a punched path costs, not what it saves (bench/bench_punch.py measures
that, on shaped links).

Alternating, median of --rounds. Needs a Docker engine and the base image.

Run: .venv/bin/python bench/bench_punch_ssh.py [--rounds 7] [--size 100M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench_tunnel_ssh import end_shared, timed
from common import P2PRC, free_port, report, start_p2prc, stop

from p2prc_core.identity import NodeIdentity
from p2prc_core.models import parse_size
from p2prc_core.my_containers import Tracked
from p2prc_core.punched import remembered
from p2prc_core.sshkeys import ensure_key
from p2prc_core.trust import TrustStore
from p2prc_core.tunnel import ssh_command


def cat_through(argv: list[str], env: dict[str, str], size: int) -> float:
    """``size`` zero bytes through ``cat`` in one session, and back; MB/s each way."""
    started = time.perf_counter()
    done = subprocess.run([*argv, "cat"], input=bytes(size), env=env, capture_output=True,
                          check=True)
    assert len(done.stdout) == size
    return 2 * size / (time.perf_counter() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", default="100M")
    args = parser.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    me = root / "me"
    identity = NodeIdentity.load_or_create(me)
    private, _ = ensure_key(me)
    TrustStore(root / "host").add(identity.node_id)
    relay_port, host_port = free_port(), free_port()
    relay = start_p2prc(root / "relay", relay_port, P2PRC_RELAY="true",
                        P2PRC_RELAY_OPEN="true", P2PRC_UPNP="false",
                        P2PRC_ALLOW_LOOPBACK="true", P2PRC_ADVERTISE_ADDRESSES="127.0.0.1")
    relay_id = NodeIdentity.load_or_create(root / "relay").node_id
    host = start_p2prc(root / "host", host_port, P2PRC_USE_RELAY="always",
                       P2PRC_RELAYS=f"{relay_id}@127.0.0.1:{relay_port}",
                       P2PRC_ADVERTISE_ADDRESSES="127.0.0.1", P2PRC_ALLOW_LOOPBACK="true",
                       P2PRC_ADVERTISE_PORT=str(free_port()), P2PRC_PORT_RANGE="43200-43299",
                       P2PRC_REFRESH_SECONDS="0", P2PRC_UPNP="false")
    host_id = NodeIdentity.load_or_create(root / "host").node_id
    base = {**os.environ, "P2PRC_HOME": str(me), "P2PRC_ALLOW_LOOPBACK": "true"}
    ways = {"punched": {**base, "P2PRC_PUNCH": "true"},
            "relay": {**base, "P2PRC_PUNCH": "false"}}
    container_id = ""
    tunnel: list[str] = []
    try:
        subprocess.run([P2PRC, "peers", "add", f"127.0.0.1:{relay_port}"], env=base,
                       check=True, capture_output=True)
        for _ in range(100):  # the host's record, naming its relay, reaches us
            subprocess.run([P2PRC, "peers", "update", "--hops", "2"], env=base,
                           capture_output=True)
            rows = json.loads(subprocess.run([P2PRC, "peers", "ls", "--json"], env=base,
                                             capture_output=True, text=True).stdout)
            if any(r["node_id"] == host_id and r["relays"] for r in rows):
                break
            time.sleep(0.2)
        touched = subprocess.run([P2PRC, "touch", host_id, "--json"], env=ways["relay"],
                                 capture_output=True, text=True)
        if touched.returncode != 0:
            raise SystemExit(f"p2prc touch failed: {touched.stderr}")
        container_id = json.loads(touched.stdout)["id"]
        entry = Tracked(me).find(container_id[:12])
        tunnel = ssh_command(me, entry, private, tunnel=True)
        for _ in range(100):  # sshd is up
            if subprocess.run([*tunnel, "true"], env=ways["relay"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        first: dict[str, list[float]] = {"punched": [], "relay": []}
        reused: dict[str, list[float]] = {"punched": [], "relay": []}
        carried: dict[str, list[float]] = {"punched": [], "relay": []}
        for index in range(args.rounds):
            for way in (("punched", "relay") if index % 2 == 0 else ("relay", "punched")):
                end_shared(tunnel)
                first[way].append(timed([*tunnel, "true"], ways[way]))
                reused[way].append(timed([*tunnel, "true"], ways[way]))
                if index < 3:
                    end_shared(tunnel)
                    carried[way].append(cat_through(tunnel, ways[way], size))
        state = remembered(me).get(host_id, {})
        print(f"the last try: {state.get('path')} ({state.get('why')})")
        report(f"ssh ... true, a first connection, {args.rounds} rounds", "over a punched path",
               first["punched"], "through the relay", first["relay"], "ms", "report both")
        report(f"ssh ... true, a reused connection, {args.rounds} rounds",
               "over a punched path", reused["punched"], "through the relay", reused["relay"],
               "ms", "report both")
        report(f"cat of {args.size} through one session, each way, 3 rounds",
               "over a punched path", carried["punched"], "through the relay",
               carried["relay"], "MB/s", "report both")
    finally:
        if tunnel:
            end_shared(tunnel)
        if container_id:
            subprocess.run([P2PRC, "rm", container_id[:12]], env=ways["relay"],
                           capture_output=True)
        stop(host)
        stop(relay)


if __name__ == "__main__":
    main()
