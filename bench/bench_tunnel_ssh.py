"""SSH through the tunnel (the host's p2prc port, ``p2prc tunnel`` as OpenSSH's ProxyCommand)
against plain ssh to the container's published port, on one machine:

1. a command's round trip: ``ssh ... true`` from start to exit (the tunnel adds the helper's
   start-up, a TLS connection and a signed upgrade);
2. an echo's round trip inside one open session (what typing feels like): a line sent,
   the same line back, median of --echoes.

Alternating, median of --rounds. Needs root, a Docker engine and the base image
(scripts/docker-engine).

Run: .venv/bin/python bench/bench_tunnel_ssh.py [--rounds 10] [--echoes 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import P2PRC, free_port, median, report, start_p2prc, stop

from p2prc_core.identity import NodeIdentity
from p2prc_core.my_containers import Tracked
from p2prc_core.sshkeys import ensure_key
from p2prc_core.trust import TrustStore
from p2prc_core.tunnel import ssh_command


def echo_rtts(argv: list[str], count: int) -> list[float]:
    """Round trips of one line each through ``cat`` in one SSH session, in ms."""
    proc = subprocess.Popen([*argv, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    times = []
    try:
        for i in range(count + 5):
            line = f"{i:08d}\n".encode()
            started = time.perf_counter()
            proc.stdin.write(line)
            got = b""
            while not got.endswith(b"\n"):
                got += proc.stdout.read(1)
            if i >= 5:  # the first few warm the session up
                times.append((time.perf_counter() - started) * 1000)
    finally:
        proc.stdin.close()
        proc.wait(10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--echoes", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    me = root / "me"
    identity = NodeIdentity.load_or_create(me)
    private, _ = ensure_key(me)
    TrustStore(root / "host").add(identity.node_id)
    port = free_port()
    env = {**os.environ, "P2PRC_HOME": str(me), "P2PRC_ALLOW_LOOPBACK": "true"}
    server = start_p2prc(root / "host", port, P2PRC_PORT_RANGE="43100-43199",
                         P2PRC_REFRESH_SECONDS="0", P2PRC_UPNP="false")
    container_id = ""
    try:
        touched = subprocess.run([P2PRC, "touch", f"127.0.0.1:{port}", "--json"], env=env,
                                 capture_output=True, text=True, check=True)
        container_id = json.loads(touched.stdout)["id"]
        entry = Tracked(me).find(container_id[:12])
        tunnel = ssh_command(me, entry, private, tunnel=True)
        direct = ssh_command(me, entry, private, tunnel=False)
        tunnel_env = direct_env = env
        for argv, run_env in ((tunnel, tunnel_env), (direct, direct_env)):  # sshd is up
            for _ in range(100):
                if subprocess.run([*argv, "true"], env=run_env,
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        ours, base = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            subprocess.run([*tunnel, "true"], env=tunnel_env, check=True, capture_output=True)
            ours.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            subprocess.run([*direct, "true"], env=direct_env, check=True, capture_output=True)
            base.append((time.perf_counter() - started) * 1000)
        report(f"ssh command round trip, {args.rounds} rounds", "through the tunnel", ours,
               "ssh to the published port", base, "ms", "report")
        ours_echo = echo_rtts(tunnel, args.echoes)
        base_echo = echo_rtts(direct, args.echoes)
        print(f"\necho round trip in an open session, {args.echoes} lines")
        for label, values in (("through the tunnel", ours_echo),
                              ("ssh to the published port", base_echo)):
            ordered = sorted(values)
            print(f"  {label:<28} median {median(values):.3f} ms, p90 "
                  f"{ordered[int(len(ordered) * 0.9)]:.3f} ms")
        print(f"  ratio {median(ours_echo) / median(base_echo):.2f} (report)")
    finally:
        if container_id:  # also when a measurement failed: nothing is left running
            subprocess.run([P2PRC, "rm", container_id[:12]], env=env, capture_output=True)
        stop(server)


if __name__ == "__main__":
    main()
