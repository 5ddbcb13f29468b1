"""Fault suite: a host killed (SIGKILL) at each step of a container create, on the real engine.

At every step (``p2prc_core.faults.POINTS``) the whole server dies at once, or only the worker
that serves the create. After a restart (or, for a worker, at the reaper's next pass) no
container, port, GPU or per-caller place is leaked, and the client's ``containers ls`` agrees
with the host's: a container that runs is listed on both sides with its lease, one that does
not is gone on both, never a ghost.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import p2prc, wait_for

from conftest import LiveServer, start_server
from p2prc_core.containers import ContainerStore
from p2prc_core.identity import NodeIdentity
from p2prc_core.storage import SERVER_DB
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]

# Where a container stands after a kill at each point: whether it runs for its caller.
RUNS_AFTER = {"create.reserved": False, "create.created": False, "create.started": True,
              "create.settled": True}
FIGURES: list[tuple[str, str, str]] = []  # (point, how, what was found): the closing note's






def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.fixture
def host(tmp_path: Path, engine: Any) -> Iterator[dict[str, Any]]:
    """The host's home (trusting the caller 'me'), and what to clean after."""
    me = NodeIdentity.load_or_create(tmp_path / "me")
    home = tmp_path / "host"
    TrustStore(home).add(me.node_id, "me")
    state: dict[str, Any] = {"home": home, "me": tmp_path / "me", "owner": me.node_id,
                             "servers": []}
    yield state
    for server in state["servers"]:
        server.stop()
    node = NodeIdentity.load_or_create(home).node_id
    for c in engine.containers.list(all=True, filters={"label": f"org.p2prc.node={node}"}):
        c.remove(force=True)


def serve(state: dict[str, Any], faults: str = "", port: int | None = None) -> LiveServer:
    env = {"P2PRC_DISABLE_PLUGINS": "nvidia", "P2PRC_CONTAINERS_PER_CALLER": "1",
           "P2PRC_REAP_SECONDS": "1", "P2PRC_PUNCH": "false"}
    if faults:
        env["P2PRC_FAULTS"] = faults
    server = start_server(state["home"], env=env, port=port)
    state["servers"].append(server)
    return server


def engine_ours(engine: Any, state: dict[str, Any]) -> dict[str, str]:
    """This host's containers as the engine has them: id -> state."""
    node = NodeIdentity.load_or_create(state["home"]).node_id
    return {c.id: c.status for c in engine.containers.list(
        all=True, filters={"label": f"org.p2prc.node={node}"})}


def host_view(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = p2prc(state["home"], "server", "containers", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {c["id"]: c for c in json.loads(result.stdout)}


def client_view(state: dict[str, Any]) -> dict[str, str]:
    result = p2prc(state["me"], "containers", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {c["id"]: c["state"] for c in json.loads(result.stdout)}


def store_rows(state: dict[str, Any]) -> tuple[set[str], dict[int, str]]:
    """The host's leases and places (ids), and the ports held (port -> holder)."""
    store = ContainerStore(state["home"], (0, 0))
    return store.lease_ids(), store.held_ports()


def assert_nothing_leaked(engine: Any, state: dict[str, Any], runs: bool) -> str:
    """The host, its engine and the client agree; returns what was found, in words."""
    ours = engine_ours(engine, state)
    running = {i for i, s in ours.items() if s == "running"}
    assert set(ours) == running, f"a container left that does not run: {ours}"
    assert len(running) == (1 if runs else 0), ours
    listed = host_view(state)
    assert set(listed) == running, (listed, ours)
    leases, ports = store_rows(state)
    assert leases == running, f"places or leases left: {leases}"
    assert set(ports.values()) <= running
    for container_id, lease in listed.items():
        assert lease["owner"] == state["owner"] and lease["expires"] > time.time()
        assert {p["external"] for p in lease["ports"]} == \
            {p for p, h in ports.items() if h == container_id}
    assert client_view(state) == {i: "running" for i in running}  # never a ghost
    return "one container, running, leased to its caller" if running else "nothing"


def caller_can_start_again(state: dict[str, Any], server: LiveServer) -> None:
    """The caller's one place (P2PRC_CONTAINERS_PER_CALLER=1) is free: after removing what
    it was found holding, a touch works, on ports the pool gives again."""
    for container_id in client_view(state):
        assert p2prc(state["me"], "rm", container_id).returncode == 0
    touched = p2prc(state["me"], "touch", server.peer(), "--json")
    assert touched.returncode == 0, touched.stderr
    assert p2prc(state["me"], "rm", json.loads(touched.stdout)["id"]).returncode == 0


@pytest.mark.parametrize("point", list(RUNS_AFTER))
def test_the_whole_server_killed_at_each_step_of_a_create(point: str, host: dict[str, Any],
                                                          engine: Any) -> None:
    server = serve(host, f"{point}=kill-server")
    workers = children(server.proc.pid)
    touched = p2prc(host["me"], "touch", server.peer(), "--json")
    assert touched.returncode != 0 and "Traceback" not in touched.stderr, touched.stderr
    assert touched.stderr.strip(), "the client says nothing"
    assert server.proc.wait(30) == -9  # the master died with its worker
    wait_for(lambda: not any(alive(w) for w in workers), what="the workers gone")
    again = serve(host, port=server.port)
    assert "Traceback" not in again.output()
    found = assert_nothing_leaked(engine, host, RUNS_AFTER[point])
    caller_can_start_again(host, again)
    FIGURES.append((point, "server killed", found))
    print(f"\n{point}: server killed -> after restart: {found}; client said: "
          f"{touched.stderr.strip().splitlines()[-1]}")


@pytest.mark.parametrize("point", list(RUNS_AFTER))
def test_the_worker_killed_at_each_step_of_a_create_is_cleaned_while_serving(
        point: str, host: dict[str, Any], engine: Any) -> None:
    server = serve(host, f"{point}=kill")
    touched = p2prc(host["me"], "touch", server.peer(), "--json")
    assert touched.returncode != 0 and "Traceback" not in touched.stderr, touched.stderr
    assert server.proc.poll() is None  # the master lives, and starts another worker
    # The reaper (every second here) adopts or removes what the dead create left, and frees
    # its place: nothing pending is left.
    wait_for(lambda: all(not i.startswith("pending-") for i in store_rows(host)[0])
             and all(s == "running" for s in engine_ours(engine, host).values()),
             what="the dead create's place freed and its container settled")
    found = assert_nothing_leaked(engine, host, RUNS_AFTER[point])
    FIGURES.append((point, "worker killed", found))
    print(f"\n{point}: worker killed -> while serving: {found}")


def test_a_place_of_a_dead_process_is_freed_at_once_and_one_of_a_live_one_is_kept(
        host: dict[str, Any], engine: Any) -> None:
    """The reaper's rule, without the engine's help: a place whose process is gone is
    stale at once; one whose process lives waits for its create (or its ten minutes)."""
    server = serve(host)
    store = ContainerStore(host["home"], (40000, 40010))
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.reserve("someone", 1, 5, f"pending-{dead.pid}-0-aaaa")
    store.reserve("someone", 1, 5, f"pending-{server.proc.pid}-0-bbbb")
    wait_for(lambda: f"pending-{dead.pid}-0-aaaa" not in store.lease_ids(),
             what="the dead process's place freed")
    assert f"pending-{server.proc.pid}-0-bbbb" in store.lease_ids()
    assert (host["home"] / SERVER_DB).exists()
