"""SSH through the tunnel (the host's p2prc port, ``python -m p2prc_core.tunnel`` as OpenSSH's
ProxyCommand) against plain ssh to the container's published port, on one machine:

1. a first connection's ``ssh ... true`` from start to exit (the tunnel adds the helper's
   start-up, a TLS connection and a signed upgrade; the shared connection is ended before
   each), and a reused one (``p2prc ssh`` keeps one connection per container: OpenSSH's
   ControlMaster), each against a fresh ssh to the published port; targets 1.2 and 1.05;
2. the helper's start to the sshd banner against a TCP connect to the published port and
   its banner, and against ``python -c pass`` (the interpreter's own start);
3. an echo's round trip inside one open session (what typing feels like): a line sent,
   the same line back, median of --echoes.

Alternating, median of --rounds. Needs root, a Docker engine and the base image
(scripts/docker-engine).

Run: .venv/bin/python bench/bench_tunnel_ssh.py [--rounds 10] [--echoes 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
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


def timed(argv: list[str], env: dict[str, str]) -> float:
    """``argv`` run to its end, in ms."""
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return (time.perf_counter() - started) * 1000


def end_shared(argv: list[str]) -> None:
    """End the shared connection ``argv`` (an ssh command line with its ControlPath) uses,
    and wait until it is gone."""
    control = next(word for word in argv if word.startswith("ControlPath="))
    check = ["ssh", "-o", control, "-O", "check", argv[-1]]
    subprocess.run(["ssh", "-o", control, "-O", "exit", argv[-1]], capture_output=True)
    while subprocess.run(check, capture_output=True).returncode == 0:
        time.sleep(0.01)


def helper_to_banner(argv: list[str]) -> float:
    """The ProxyCommand helper from its start to the sshd's banner, in ms."""
    proxy = next(word for word in argv if word.startswith("ProxyCommand="))
    words = shlex.split(proxy.partition("=")[2])
    started = time.perf_counter()
    proc = subprocess.Popen(words, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdin is not None
    got = b""
    while b"\n" not in got:
        got += proc.stdout.read1(256)  # type: ignore[attr-defined]
    took = (time.perf_counter() - started) * 1000
    proc.stdin.close()
    proc.wait(10)
    assert got.startswith(b"SSH-"), got
    return took


def tcp_to_banner(host: str, port: int) -> float:
    """A TCP connect to the published port to the sshd's banner, in ms."""
    started = time.perf_counter()
    with socket.create_connection((host, port), 10) as sock:
        got = b""
        while b"\n" not in got:
            got += sock.recv(256)
    return (time.perf_counter() - started) * 1000


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
    tunnel: list[str] = []
    try:
        touched = subprocess.run([P2PRC, "touch", f"127.0.0.1:{port}", "--json"], env=env,
                                 capture_output=True, text=True, check=True)
        container_id = json.loads(touched.stdout)["id"]
        entry = Tracked(me).find(container_id[:12])
        tunnel = ssh_command(me, entry, private, tunnel=True)
        direct = ssh_command(me, entry, private, tunnel=False)
        for argv in (tunnel, direct):  # sshd is up
            for _ in range(100):
                if subprocess.run([*argv, "true"], env=env,
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        first, reused, base = [], [], []
        for _ in range(args.rounds):
            end_shared(tunnel)
            first.append(timed([*tunnel, "true"], env))
            reused.append(timed([*tunnel, "true"], env))
            base.append(timed([*direct, "true"], env))
        report(f"ssh ... true, a first connection, {args.rounds} rounds", "through the tunnel",
               first, "ssh to the published port", base, "ms", "at most 1.2")
        report(f"ssh ... true, a reused connection, {args.rounds} rounds",
               "through the tunnel, reused", reused, "ssh to the published port", base, "ms",
               "at most 1.05")
        helper, tcp, bare = [], [], []
        for _ in range(args.rounds):
            helper.append(helper_to_banner(tunnel))
            tcp.append(tcp_to_banner(entry.host, entry.ssh_port))
            bare.append(timed([sys.executable, "-c", "pass"], env))
        report(f"the helper's start to the sshd banner, {args.rounds} rounds",
               "the helper", helper, "TCP connect and banner", tcp, "ms",
               "at most 60 ms more")
        print(f"  difference {median(helper) - median(tcp):.1f} ms; python -c pass: median "
              f"{median(bare):.1f} ms")
        end_shared(tunnel)
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
        if tunnel:
            end_shared(tunnel)
        if container_id:  # also when a measurement failed: nothing is left running
            subprocess.run([P2PRC, "rm", container_id[:12]], env=env, capture_output=True)
        stop(server)


if __name__ == "__main__":
    main()
