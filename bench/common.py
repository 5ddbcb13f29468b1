"""Helpers shared by the benchmarks: servers in subprocesses, medians, ratios."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from p2prc_core.tls import client_context

ROOT = Path(__file__).resolve().parent.parent
P2PRC = str(Path(sys.executable).with_name("p2prc"))


@contextlib.contextmanager
def older_code(ref: str) -> Iterator[Path]:
    """The tree of git commit ``ref`` in a temporary worktree (for ``PYTHONPATH``: a
    benchmark's baseline that is this project's own earlier code)."""
    with tempfile.TemporaryDirectory(prefix="p2prc-baseline-") as where:
        tree = Path(where) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(tree), ref], check=True)
        # compiled as ours is (where PYTHONDONTWRITEBYTECODE is set, nothing else would)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=False,
                       stdout=subprocess.DEVNULL)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tree)], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], wait: float = 20) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1, verify=client_context())
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def start_p2prc(home: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([P2PRC, "server", "--port", str(port)],
                            env={**os.environ, "P2PRC_HOME": str(home),
                                 "P2PRC_ACCESS_LOG": "false", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheme = "http" if env.get("P2PRC_TRANSPORT") == "http" else "https"
    wait_http(f"{scheme}://127.0.0.1:{port}/v1/health", proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(title: str, ours_label: str, ours: list[float], base_label: str, base: list[float],
           unit: str, target: str) -> float:
    ratio = median(ours) / median(base)
    print(f"\n{title}")
    print(f"  {ours_label:<28} median {median(ours):>12,.1f} {unit}  runs "
          + ", ".join(f"{v:,.0f}" for v in ours))
    print(f"  {base_label:<28} median {median(base):>12,.1f} {unit}  runs "
          + ", ".join(f"{v:,.0f}" for v in base))
    print(f"  ratio {ratio:.2f} (target {target})")
    return ratio


def iperf3_download(address: str, port: int, size: int, client_prefix: list[str] | None = None,
                    bind: str | None = None) -> float:
    """``iperf3 -R`` of ``size`` bytes from a one-off iperf3 server on ``port``; Mbit/s.
    ``client_prefix`` runs the client elsewhere (``ip netns exec NAME``)."""
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port),
                               *(["-B", bind] if bind else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            client = subprocess.run([*(client_prefix or []), "iperf3", "-c", address, "-p",
                                     str(port), "-R", "-n", str(size), "-J"],
                                    capture_output=True, text=True)
            data = json.loads(client.stdout or "{}")
            if "error" not in data and client.returncode == 0:
                return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
            time.sleep(0.1)  # the server was not listening yet
        raise SystemExit(f"iperf3 failed: {client.stdout} {client.stderr}")
    finally:
        server.wait(30)
