"""The server's front (request heads read in the event loop) against gunicorn's own gthread
worker, on the same app, settings and TLS: what an ordinary request costs when all is quiet,
and how long it takes while strangers hold slow connections (heads dripped a byte at a
time, connections that say nothing).

Run: .venv/bin/python bench/bench_front.py [--rounds 5] [--drippers 40] [--silent 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import free_port, median, report, stop, wait_http

from p2prc_core.tls import client_context

HERE = Path(__file__).resolve().parent
HEAD = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


def serve(home: Path, worker: str, threads: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "serve_hello.py"), str(port), worker],
        env={**os.environ, "P2PRC_HOME": str(home), "P2PRC_ACCESS_LOG": "false",
             "P2PRC_WORKERS": "1", "P2PRC_THREADS": str(threads), "P2PRC_UPNP": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"https://127.0.0.1:{port}/", proc)
    return proc, port


def request_ms(port: int, count: int, timeout: float) -> tuple[list[float], int]:
    """Each request on a new connection (TLS handshake included): milliseconds, and how many
    got no answer within ``timeout``."""
    took, failed = [], 0
    for _ in range(count):
        started = time.perf_counter()
        try:
            httpx.get(f"https://127.0.0.1:{port}/v1/specs", verify=client_context(),
                      timeout=timeout)
            took.append((time.perf_counter() - started) * 1000)
        except httpx.HTTPError:
            failed += 1
            took.append(timeout * 1000)
    return took, failed


class Strangers:
    """Dripping TLS connections and silent TCP ones, opened as an attacker would (all at
    once, none waiting for the server) and kept up (reopened when closed), from threads of
    their own."""

    def __init__(self, port: int, drippers: int, silent: int):
        self.port = port
        self.stopping = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._silent, daemon=True)
                        for _ in range(silent)]
        self.threads += [threading.Thread(target=self._drip, daemon=True)
                         for _ in range(drippers)]
        for thread in self.threads:
            thread.start()

    def _silent(self) -> None:
        while not self.stopping.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                continue
            self.socks.append(sock)
            sock.settimeout(0.5)
            while not self.stopping.is_set():
                try:
                    if sock.recv(1) == b"":
                        break  # closed by the server: open another
                except TimeoutError:
                    continue
                except OSError:
                    break

    def _drip(self) -> None:
        while not self.stopping.is_set():
            try:
                sock = client_context().wrap_socket(
                    socket.create_connection(("127.0.0.1", self.port), timeout=5))
            except OSError:
                continue
            self.socks.append(sock)
            sent = 0
            while not self.stopping.wait(0.5):
                try:
                    sock.send(HEAD[sent % (len(HEAD) - 1):][:1])  # never the last byte
                    sent += 1
                except OSError:
                    break

    def close(self) -> None:
        self.stopping.set()
        for sock in list(self.socks):
            sock.close()
        for thread in self.threads:
            thread.join(6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--drippers", type=int, default=40)
    parser.add_argument("--silent", type=int, default=60)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds the strangers connect before requests are timed")
    args = parser.parse_args()
    quiet: dict[str, list[float]] = {"front": [], "gthread": []}
    loaded: dict[str, list[float]] = {"front": [], "gthread": []}
    failures = {"front": 0, "gthread": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for worker in ("front", "gthread"):
                proc, port = serve(Path(tmp) / worker, worker, args.threads)
                try:
                    took, _ = request_ms(port, args.requests, args.timeout)
                    quiet[worker].append(median(took))
                    strangers = Strangers(port, args.drippers, args.silent)
                    time.sleep(args.warmup)  # the attack builds up
                    try:
                        took, failed = request_ms(port, args.requests, args.timeout)
                    finally:
                        strangers.close()
                    loaded[worker].append(median(took))
                    failures[worker] += failed
                finally:
                    stop(proc)
    report("An ordinary request on a new connection, nothing else going on (ms)",
           "p2prc's front", quiet["front"], "gunicorn gthread", quiet["gthread"], "ms",
           "<= 1.10")
    report(f"The same while {args.drippers} connections drip their heads and {args.silent} "
           f"say nothing, {args.threads} threads (ms; a request unanswered in "
           f"{args.timeout:g} s counts {args.timeout:g} s)",
           "p2prc's front", loaded["front"], "gunicorn gthread", loaded["gthread"], "ms",
           "well under 1")
    total = args.rounds * args.requests
    print(f"  unanswered within {args.timeout:g} s: front {failures['front']} of {total}, "
          f"gthread {failures['gthread']} of {total}")


if __name__ == "__main__":
    main()
