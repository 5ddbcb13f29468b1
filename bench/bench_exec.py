"""`p2prc exec` against what a user at the host (or scp) would do, side by side in one run:

1. `p2prc exec --on HOST -- true` (a container started, the command run over the tunnel,
   the container removed) against `docker run --rm p2prc/base:latest true` on the host
   itself: with no warm pool, and with a warm pool of 2 (a second server on the same home
   settings but `container_warm_pool = 2`).
2. --size bytes in (`exec -i FILE -- true`) and out (`exec -o`) against `scp` to and from
   the container's published SSH port: throughput of the transfer (the exec's time less the
   same exec without the file), and of the whole command beside it.
3. The first line of output: the container prints its clock, the client notes when the line
   reached it (one machine, one clock).

Needs root, a Docker engine and the base image (scripts/docker-engine).

Run: .venv/bin/python bench/bench_exec.py [--rounds 5] [--size 1G]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import P2PRC, free_port, median, report, start_p2prc, stop

from p2prc_core.identity import NodeIdentity
from p2prc_core.sshkeys import ensure_key
from p2prc_core.trust import TrustStore

IMAGE = "p2prc/base:latest"


def p2prc(home: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([P2PRC, *args], env={**os.environ, "P2PRC_HOME": str(home)},
                          check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return (time.perf_counter() - started) * 1000


def size_of(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def host(root: Path, name: str, me: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    TrustStore(root / name).add(me)
    port = free_port()
    server = start_p2prc(root / name, port, P2PRC_CONTAINERS_PER_CALLER="20",
                         P2PRC_REFRESH_SECONDS="0", P2PRC_ALLOW_LOOPBACK="true",
                         P2PRC_ADVERTISE_ADDRESSES="127.0.0.1", **env)
    return server, port


def wait_pool(home: Path, wanted: int, deadline: float = 120) -> None:
    """Until the host's pool holds ``wanted`` containers (its `server containers ls`)."""
    stop_at = time.monotonic() + deadline
    while time.monotonic() < stop_at:
        listing = subprocess.run([P2PRC, "server", "containers", "ls", "--json"],
                                 env={**os.environ, "P2PRC_HOME": str(home)},
                                 capture_output=True, text=True)
        rows = json.loads(listing.stdout or "[]")
        if sum(1 for r in rows if r.get("pool") is True) >= wanted:
            return
        time.sleep(0.2)
    raise SystemExit(f"the pool did not fill to {wanted} within {deadline} s")


def exec_vs_docker_run(me_home: Path, port: int, rounds: int) -> tuple[list[float], list[float]]:
    env = {**os.environ, "P2PRC_HOME": str(me_home)}
    ours, base = [], []
    for _ in range(rounds):
        ours.append(timed([P2PRC, "exec", "--on", f"127.0.0.1:{port}", "--", "true"], env))
        base.append(timed(["docker", "run", "--rm", IMAGE, "true"]))
    return ours, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--warm-only", action="store_true", help="only the warm-pool figure")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-exec-"))
    me_home = root / "me"
    me = NodeIdentity.load_or_create(me_home).node_id

    if not args.warm_only:
        cold_figures(root, me_home, me, args)
    warm_figure(root, me_home, me, args.rounds)


def cold_figures(root: Path, me_home: Path, me: str, args: argparse.Namespace) -> None:
    """No warm pool: exec against docker run, inputs against scp, the first output line."""
    cold, cold_port = host(root, "cold", me)
    try:
        p2prc(me_home, "peers", "add", f"127.0.0.1:{cold_port}")
        ours, base = exec_vs_docker_run(me_home, cold_port, args.rounds)
        report(f"exec -- true, no warm pool, {args.rounds} rounds", "p2prc exec", ours,
               "docker run --rm (on the host)", base, "ms", "reported")

        transfer_figures(root, me_home, cold_port, size_of(args.size), args.size)

        env = {**os.environ, "P2PRC_HOME": str(me_home)}
        lags = []
        for _ in range(args.rounds):
            proc = subprocess.Popen([P2PRC, "exec", "--on", f"127.0.0.1:{cold_port}", "--",
                                     "python3", "-c",
                                     "import time; print(time.time(), flush=True)"],
                                    env=env, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            arrived = time.time()
            proc.wait(60)
            lags.append((arrived - float(line.split()[0])) * 1000)
        print(f"\nfirst output line, container print to client read: median "
              f"{median(lags):.1f} ms, runs {', '.join(f'{v:.1f}' for v in lags)} "
              f"(target <= 50 ms)")
    finally:
        stop(cold)



def transfer_figures(root: Path, me_home: Path, port: int, size: int, label: str,
                     rounds: int = 2) -> None:
    """``size`` bytes in (``exec -i``) and back out (``exec -o``), against scp to and from the
    container's published SSH port. Our transfer's time is the exec's less the same exec
    without the file (its start, the command and the end are not the transfer); the whole
    command's throughput is printed beside it."""
    data = root / "input.bin"
    with open(data, "wb") as out:
        for _ in range(max(1, size >> 20)):
            out.write(os.urandom(1 << 20))
    env = {**os.environ, "P2PRC_HOME": str(me_home)}
    # The files land on a tmpfs charged to the container's memory: room for them.
    memory = f"{max(1, (2 * size) >> 30) + 1}G"
    exec_ = [P2PRC, "exec", "--on", f"127.0.0.1:{port}", "--memory", memory]
    make = ["--", "sh", "-c", f"head -c {size} /dev/zero > big"]
    mib = size / (1 << 20)
    whole: dict[str, list[float]] = {"in": [], "out": []}
    ours: dict[str, list[float]] = {"in": [], "out": []}
    base: dict[str, list[float]] = {"in": [], "out": []}
    key, _ = ensure_key(me_home)
    with tempfile.TemporaryDirectory(dir=root) as got:
        for round_ in range(rounds):
            empty = timed([*exec_, "--", "true"], env)
            with_in = timed([*exec_, "-i", str(data), "--", "true"], env)
            made = timed([*exec_, *make], env)
            with_out = timed([*exec_, "-o", f"big:{got}/r{round_}", *make], env)
            shutil.rmtree(f"{got}/r{round_}")  # each copy out writes to a page cache as empty
            whole["in"].append(mib / (with_in / 1000))
            whole["out"].append(mib / (with_out / 1000))
            ours["in"].append(mib / (max(1.0, with_in - empty) / 1000))
            ours["out"].append(mib / (max(1.0, with_out - made) / 1000))
            touched = json.loads(p2prc(me_home, "touch", f"127.0.0.1:{port}", "--memory",
                                       memory, "--json", text=True).stdout)
            scp = ["scp", "-i", str(key), "-P", str(touched["ssh_port"]), "-o",
                   "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                   "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
            base["in"].append(mib / (timed([*scp, str(data), "root@127.0.0.1:/tmp/in"]) / 1000))
            base["out"].append(mib / (timed([*scp, "root@127.0.0.1:/tmp/in",
                                             f"{got}/back{round_}"]) / 1000))
            os.unlink(f"{got}/back{round_}")
            p2prc(me_home, "rm", touched["id"][:12])
    data.unlink()
    for way, flag in (("in", "-i"), ("out", "-o")):
        report(f"{label} {way} (MiB/s; higher is better), {rounds} rounds",
               f"p2prc exec {flag} (transfer)", ours[way], f"scp {way}", base[way], "MiB/s",
               ">= 0.9")
        print(f"  the whole exec {flag} command, start and end included: median "
              f"{median(whole[way]):,.1f} MiB/s")


def warm_figure(root: Path, me_home: Path, me: str, rounds: int) -> None:
    """A warm pool of 2: exec against docker run."""
    warm, warm_port = host(root, "warm", me, P2PRC_CONTAINER_WARM_POOL="2")
    try:
        p2prc(me_home, "peers", "add", f"127.0.0.1:{warm_port}")
        ours, base = [], []
        for _ in range(rounds):
            wait_pool(root / "warm", 2)
            one, two = exec_vs_docker_run(me_home, warm_port, 1)
            ours += one
            base += two
        report(f"exec -- true, warm pool of 2, {rounds} rounds", "p2prc exec", ours,
               "docker run --rm (on the host)", base, "ms", "<= 1.0")
    finally:
        stop(warm)


if __name__ == "__main__":
    main()
