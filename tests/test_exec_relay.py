"""`p2prc exec` on a host that only a relay reaches: the container is started, the inputs go
in, the command runs and the outputs come back, every byte through the relay (TLS to the
host inside the relay's stream) where punching is off, and over a punched UDP path (QUIC)
met through the relay where the host sits behind a home router that allows one."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from natlab import NatLab
from test_containers import docker_client, p2prc_containers
from test_natlab import (
    dial,
    labs,
    learn_through,
    node_id,
    peers,
    serve,
    serve_relay,
    wait_for,
    waits_at,
)

from conftest import P2PRC, free_port, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.integration, pytest.mark.docker]

__all__ = ["docker_client", "labs"]  # fixtures, used by name


def me(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """p2prc as this machine's user, punching off: every byte goes through the relay."""
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "P2PRC_HOME": str(home),
                               "P2PRC_ALLOW_LOOPBACK": "true", "P2PRC_PUNCH": "false"})


def test_exec_through_a_relay_runs_with_inputs_and_outputs(tmp_path: Path,
                                                           docker_client: Any) -> None:
    home = tmp_path / "me"
    me_id = NodeIdentity.load_or_create(home).node_id
    relay = start_server(tmp_path / "relay", env={"P2PRC_RELAY": "true",
                                                  "P2PRC_RELAY_OPEN": "true"})
    host_home = tmp_path / "host"
    host_home.mkdir()
    TrustStore(host_home).add(me_id, "me")
    # The host advertises a port where nothing listens: a direct dial is refused at once,
    # and the relay is the one way in (nothing here leaves this machine).
    host = start_server(host_home, env={
        "P2PRC_USE_RELAY": "always", "P2PRC_DISABLE_PLUGINS": "nvidia",
        "P2PRC_ADVERTISE_ADDRESSES": "127.0.0.1", "P2PRC_ADVERTISE_PORT": str(free_port()),
        "P2PRC_RELAYS": f"{relay.node_id}@127.0.0.1:{relay.port}"})
    try:
        deadline = time.monotonic() + 30
        while not any((relay.home / "relay").glob(f"w.{host.node_id}.*")):
            assert time.monotonic() < deadline, "the host never waited at the relay"
            time.sleep(0.05)
        assert me(home, "peers", "add", relay.peer()).returncode == 0
        deadline = time.monotonic() + 30
        while True:  # the host's record (naming its relay) reaches us from the relay
            me(home, "peers", "update", "--hops", "2")
            rows = {r["node_id"]: r for r in json.loads(me(home, "peers", "ls", "--json")
                                                       .stdout)}
            if host.node_id in rows and rows[host.node_id]["relays"]:
                break
            assert time.monotonic() < deadline, f"never learnt the host's relay: {rows}"
            time.sleep(0.2)

        data = tmp_path / "in"
        data.mkdir()
        (data / "numbers.txt").write_text("1\n2\n3\n")
        out = tmp_path / "results"
        result = me(home, "exec", "--on", host.node_id, "-i", str(data), "-o",
                    f"/job/sum.txt:{out}", "--", "sh", "-c",
                    "awk '{s+=$1} END {print s}' in/numbers.txt | tee sum.txt")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().splitlines()[-1] == "6"
        assert (out / "sum.txt").read_text().strip() == "6"
        rows = {r["node_id"]: r for r in json.loads(me(home, "peers", "ls", "--json").stdout)}
        assert rows[host.node_id]["path"] == "relay", rows[host.node_id]
        wait_for(lambda: not p2prc_containers(docker_client, host.node_id), timeout=30,
                 what="the host removed the job's container")  # at the end, unwaited for
    finally:
        host.stop()
        relay.stop()
        for container_id in p2prc_containers(docker_client, host.node_id):
            docker_client.containers.get(container_id).remove(force=True)


@pytest.mark.netns
def test_exec_on_a_friend_behind_a_home_router_through_its_relay(
        tmp_path: Path, docker_client: Any, labs: Callable[..., NatLab]) -> None:
    """The NAT lab: home runs containers behind a router that masquerades; friend, out on
    the lab's internet, knows only the relay; ``p2prc exec`` on home, files in and out,
    meets home through the relay and goes direct over a punched path (exec streams need
    nothing of home but its p2prc port)."""
    lab = labs()
    public, friend = lab.add_internet_host("public"), lab.add_internet_host("friend")
    relay = serve_relay(lab, public)
    home = node_id(lab.home)
    TrustStore(lab.home.home).add(node_id(friend), "friend")
    # Docker publishes in this machine's own namespace, which home's server cannot see:
    # a port free there.
    port = free_port()
    serve(lab, lab.home, P2PRC_RELAYS=relay, P2PRC_DISABLE_PLUGINS="nvidia",
          P2PRC_PORT_RANGE=f"{port}-{port}")
    try:
        wait_for(lambda: waits_at(public, home), timeout=30, what="home waits at the relay")
        learn_through(friend, public, home)
        assert dial(friend, lab.router_external_ip).startswith("FAILED")  # no way in but the relay
        (friend.home / "in.txt").write_text("behind the router\n")
        out = friend.home / "got"
        done = subprocess.run(friend.command(
            P2PRC, "exec", "--on", home, "-i", str(friend.home / "in.txt"), "-o",
            f"rev.txt:{out}", "--", "sh", "-c",
            "rev in.txt | tee rev.txt; echo to-stderr >&2; exit 3"),
            capture_output=True, text=True, timeout=180, env=friend.env(),
            stdin=subprocess.DEVNULL)  # no terminal: a TTY would take SSH
        assert done.returncode == 3, done.stdout + done.stderr  # the command's own code
        assert done.stdout == "retuor eht dniheb\n" and "to-stderr" in done.stderr
        assert (out / "rev.txt").read_text() == "retuor eht dniheb\n"
        assert peers(friend)[home]["path"] == "punched"  # a cone NAT and none: direct
        wait_for(lambda: not p2prc_containers(docker_client, home), timeout=30,
                 what="home removed the job's container")
    finally:
        for container_id in p2prc_containers(docker_client, home):
            docker_client.containers.get(container_id).remove(force=True)
