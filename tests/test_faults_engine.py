"""Fault suite: the Docker engine restarted (as an upgrade does) while containers run, and while
one is being created. Leases are reconciled: running containers keep their ports and expiry
and can still be logged into, one that died meanwhile is released, and a create caught by the
restart either ran and is leased or left nothing behind.

The engine must be one this suite may restart: started by ``scripts/docker-engine`` (with
``--live-restore``, so containers outlive it), not by systemd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import p2prc, wait_for

from conftest import P2PRC, LiveServer, require, start_server
from p2prc_core.containers import ContainerStore
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
PIDFILE = Path("/var/run/docker.pid")






def engine_pid() -> int:
    require(PIDFILE.exists(), "no /var/run/docker.pid: an engine this suite cannot restart")
    pid = int(PIDFILE.read_text().strip())
    cgroup = Path(f"/proc/{pid}/cgroup")
    require(cgroup.exists(), "the engine's process is not visible here")
    require("docker.service" not in cgroup.read_text(),
            "the engine is systemd's (docker.service): the fault suite restarts only an "
            "engine that scripts/docker-engine started")
    return pid


def stop_engine() -> None:
    pid = engine_pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 120, "the engine stopped")


def start_engine(engine: Any) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "docker-engine"), "--no-image"],
                   check=True, timeout=180, capture_output=True)
    wait_for(lambda: _pings(engine), 60, "the engine answers")


def _pings(engine: Any) -> bool:
    try:
        return bool(engine.ping())
    except Exception:  # noqa: BLE001 - not yet
        return False


@pytest.fixture
def restartable(engine: Any) -> Iterator[Any]:
    """The engine, with live restore on (restarted once to turn it on, before any container
    of this test runs); started again after the test whatever happens."""
    engine_pid()
    if not engine.info().get("LiveRestoreEnabled"):
        stop_engine()
        start_engine(engine)
        require(bool(engine.info().get("LiveRestoreEnabled")),
                "the engine runs without --live-restore")
    try:
        yield engine
    finally:
        if not _pings(engine):
            start_engine(engine)


@pytest.fixture
def host(tmp_path: Path, restartable: Any) -> Iterator[dict[str, Any]]:
    me = NodeIdentity.load_or_create(tmp_path / "me")
    home = tmp_path / "host"
    TrustStore(home).add(me.node_id, "me")
    state: dict[str, Any] = {"home": home, "me": tmp_path / "me", "servers": []}
    yield state
    for server in state["servers"]:
        server.stop()
    node = NodeIdentity.load_or_create(home).node_id
    for c in restartable.containers.list(all=True,
                                         filters={"label": f"org.p2prc.node={node}"}):
        c.remove(force=True)


def serve(state: dict[str, Any], faults: str = "") -> LiveServer:
    env = {"P2PRC_DISABLE_PLUGINS": "nvidia", "P2PRC_CONTAINERS_PER_CALLER": "3",
           "P2PRC_REAP_SECONDS": "1", "P2PRC_CONTAINER_EXITED_GRACE": "1",
           "P2PRC_PUNCH": "false"}
    if faults:
        env["P2PRC_FAULTS"] = faults
    server = start_server(state["home"], env=env)
    state["servers"].append(server)
    return server


def host_view(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = p2prc(state["home"], "server", "containers", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {c["id"]: c for c in json.loads(result.stdout)}


def touch(state: dict[str, Any], server: LiveServer) -> str:
    done = p2prc(state["me"], "touch", server.peer(), "--json")
    assert done.returncode == 0, done.stderr
    container_id: str = json.loads(done.stdout)["id"]
    return container_id


def test_an_engine_restart_keeps_running_containers_and_releases_one_that_died(
        host: dict[str, Any], restartable: Any) -> None:
    server = serve(host)
    kept, dies = touch(host, server), touch(host, server)
    before = host_view(host)
    main_pid = restartable.api.inspect_container(dies)["State"]["Pid"]
    stop_engine()
    os.kill(main_pid, signal.SIGKILL)  # it dies while the engine is away
    start_engine(restartable)
    # The one that died is released (its ports and place free) once the engine says so.
    wait_for(lambda: set(host_view(host)) == {kept}, 60, "the dead one released")
    after = host_view(host)[kept]
    assert after["state"] == "running"
    assert after["ports"] == before[kept]["ports"]
    assert after["expires"] == before[kept]["expires"]
    held = ContainerStore(host["home"], (0, 0)).held_ports()
    assert set(held.values()) == {kept}
    # Its caller still logs in, through the host's port (the engine's rules came back).
    login = p2prc(host["me"], "ssh", kept[:12], "--", "echo", "still here")
    assert login.returncode == 0 and "still here" in login.stdout, login.stderr
    listed = json.loads(p2prc(host["me"], "containers", "ls", "--json").stdout)
    assert {c["id"]: c["state"] for c in listed} == {kept: "running", dies: "gone"}
    assert touch(host, server)  # and the host creates again
    assert "Traceback" not in server.output(), server.output()


def test_a_create_caught_by_an_engine_restart_leaves_nothing(
        host: dict[str, Any], restartable: Any) -> None:
    """The engine stops after it created the container and before it started it (the
    create waits there 5 s): the caller hears that the host cannot run containers now, and
    once the engine is back nothing is left of it: no container, lease, place or port."""
    server = serve(host, "create.created=sleep:5")
    node = server.node_id
    started = subprocess.Popen([P2PRC, "touch", server.peer(), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "P2PRC_HOME": str(host["me"])})
    try:
        wait_for(lambda: restartable.api.containers(
            all=True, filters={"label": f"org.p2prc.node={node}"}), 60, "the container made")
        stop_engine()
        out, err = started.communicate(timeout=120)
    finally:
        if started.poll() is None:
            started.kill()
    assert started.returncode != 0 and "Traceback" not in err, err
    assert "cannot run containers now" in err, err
    start_engine(restartable)
    wait_for(lambda: not restartable.api.containers(
        all=True, filters={"label": f"org.p2prc.node={node}"}), 60, "the half-made one gone")
    store = ContainerStore(host["home"], (0, 0))
    wait_for(lambda: not store.lease_ids() and not store.held_ports(), 30,
             "no lease, place or port left")
    assert "Traceback" not in server.output(), server.output()
