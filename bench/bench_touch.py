"""Time from asking for a container to SSH accepting a login: p2prc (a signed request to a
real server, which also limits, labels and hardens the container and reads its host key)
against the docker SDK's containers.run of the same image, followed by the same wait.
Alternating, median of --rounds each. Needs root, a Docker engine and the base image
(scripts/docker-engine).

Run: .venv/bin/python bench/bench_touch.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import docker
from common import free_port, report, start_p2prc, stop

from p2prc_core.client import PeerClient
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.sshkeys import ensure_key
from p2prc_core.trust import TrustStore
from p2prc_core.wire import ContainerRequest

IMAGE = "p2prc/base:latest"


def wait_for_login(key: Path, port: int, deadline: float = 30) -> None:
    """The same wait for both: ssh until a login runs a command."""
    stop_at = time.monotonic() + deadline
    while time.monotonic() < stop_at:
        result = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=2", "-o", "LogLevel=ERROR", "root@127.0.0.1", "true"],
            capture_output=True)
        if result.returncode == 0:
            return
        time.sleep(0.02)
    raise SystemExit(f"no SSH login on port {port} within {deadline} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    client = docker.from_env()
    client.images.get(IMAGE)
    root = Path(tempfile.mkdtemp(prefix="p2prc-bench-"))
    me = NodeIdentity.load_or_create(root / "me")
    private, public = ensure_key(root / "me")
    TrustStore(root / "host").add(me.node_id)
    port = free_port()
    server = start_p2prc(root / "host", port, P2PRC_CONTAINERS_PER_CALLER="100",
                         P2PRC_PORT_RANGE="43000-43099", P2PRC_REFRESH_SECONDS="0")
    ours, base = [], []
    try:
        with PeerClient(Endpoint("127.0.0.1", port), timeout=60, identity=me) as peer:
            for _ in range(args.rounds):
                started = time.perf_counter()
                reply = peer.create_container(ContainerRequest(public))
                wait_for_login(private, reply.ssh_port)
                ours.append((time.perf_counter() - started) * 1000)
                peer.remove_container(reply.id)

                host_port = free_port()
                started = time.perf_counter()
                container = client.containers.run(
                    IMAGE, detach=True, environment={"P2PRC_SSH_KEY": public},
                    ports={"22/tcp": host_port})
                wait_for_login(private, host_port)
                base.append((time.perf_counter() - started) * 1000)
                container.remove(force=True)
    finally:
        stop(server)
    report(f"request to SSH login, {args.rounds} rounds", "p2prc touch", ours,
           "docker SDK containers.run", base, "ms", "<= 1.15")


if __name__ == "__main__":
    main()
