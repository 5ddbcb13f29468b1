"""Fault suite: the client's own process killed (SIGKILL: a laptop closed, the OOM killer)
in the middle of a ``touch``, a ``run`` and an ``exec``. What the host started for it is then
either tracked by the client (``containers ls`` shows it, and the host agrees) or ends with its
lease; the client's own records say what happened (never a run or a job running for ever)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import p2prc, wait_for

from conftest import P2PRC, LiveServer, require, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]






def spawn(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([P2PRC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "P2PRC_HOME": str(home)},
                            start_new_session=True)


def kill_all(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the command and what it started (its session: ansible-playbook, ssh), as a
    closed laptop or the OOM killer's sweep of a terminal would."""
    os.killpg(proc.pid, 9)
    proc.wait(30)


@pytest.fixture
def host(tmp_path: Path, engine: Any) -> Iterator[dict[str, Any]]:
    me = tmp_path / "me"
    TrustStore(tmp_path / "host").add(NodeIdentity.load_or_create(me).node_id, "me")
    state: dict[str, Any] = {"me": me, "home": tmp_path / "host", "servers": []}
    yield state
    for server in state["servers"]:
        server.stop()
    node = NodeIdentity.load_or_create(state["home"]).node_id
    for c in engine.containers.list(all=True, filters={"label": f"org.p2prc.node={node}"}):
        c.remove(force=True)


def serve(state: dict[str, Any], **env: str) -> LiveServer:
    server = start_server(state["home"], env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                              "P2PRC_PUNCH": "false", **env})
    state["servers"].append(server)
    return server


def host_ids(state: dict[str, Any]) -> set[str]:
    done = p2prc(state["home"], "server", "containers", "ls", "--json")
    assert done.returncode == 0, done.stderr
    return {c["id"] for c in json.loads(done.stdout)}


def client_states(state: dict[str, Any]) -> dict[str, str]:
    done = p2prc(state["me"], "containers", "ls", "--json")
    assert done.returncode == 0, done.stderr
    return {c["id"]: c["state"] for c in json.loads(done.stdout)}


def test_a_client_killed_while_its_container_starts_finds_it_at_the_next_ls(
        host: dict[str, Any], engine: Any) -> None:
    server = serve(host, P2PRC_FAULTS="create.started=sleep:3")
    touch = spawn(host["me"], "touch", server.peer(), "--json")
    node = server.node_id
    wait_for(lambda: engine.api.containers(filters={"label": f"org.p2prc.node={node}"}),
             what="the host started the container")
    kill_all(touch)  # before the host's answer came
    assert not json.loads((host["me"] / "containers.json").read_text()
                          if (host["me"] / "containers.json").exists() else "{}")
    [started] = wait_for(lambda: host_ids(host), what="the host leased it")
    assert client_states(host) == {started: "running"}  # found, tracked, as the host says
    assert json.loads((host["me"] / "asked.json").read_text()) == {}  # settled: asked once
    assert p2prc(host["me"], "rm", started[:12]).returncode == 0
    assert host_ids(host) == set()


@pytest.mark.ansible
def test_a_client_killed_mid_run_shows_the_run_killed_and_keeps_its_container(
        host: dict[str, Any], tmp_path: Path, engine: Any) -> None:
    require(shutil.which("ansible-playbook") is not None, "ansible-playbook is missing")
    server = serve(host)
    touched = p2prc(host["me"], "touch", server.peer(), "--json")
    assert touched.returncode == 0, touched.stderr
    box = json.loads(touched.stdout)["id"]
    playbook = tmp_path / "work" / "site.yml"
    playbook.parent.mkdir()
    playbook.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                        "    - shell: touch /tmp/begun && sleep 600\n")
    run = spawn(host["me"], "run", str(playbook), "--on", box[:12])
    container = engine.containers.get(box)
    wait_for(lambda: container.exec_run(["test", "-e", "/tmp/begun"]).exit_code == 0, 120,
             "the playbook's task begun in the container")
    kill_all(run)
    runs = json.loads(p2prc(host["me"], "runs", "ls", "--json").stdout)
    assert [r["state"] for r in runs] == ["killed"], runs
    listed = p2prc(host["me"], "runs", "ls")
    assert "killed" in listed.stdout, listed.stdout
    assert client_states(host) == {box: "running"} and host_ids(host) == {box}
    # The container is the caller's to use again at once: a new run on it works.
    playbook.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                        "    - command: echo again\n")
    again = p2prc(host["me"], "run", str(playbook), "--on", box[:12], "--json")
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_client_killed_mid_exec_leaves_a_job_it_can_tell_and_a_container_it_tracks(
        host: dict[str, Any], engine: Any) -> None:
    server = serve(host)
    job = spawn(host["me"], "exec", "--on", server.peer(), "--timeout", "10m", "--", "sh",
                "-c", "echo begun; sleep 600")
    assert job.stdout is not None
    wait_for(lambda: "begun" in (job.stdout.readline() or ""), 120, "the command begun")
    kill_all(job)
    [box] = host_ids(host)
    assert client_states(host) == {box: "running"}  # tracked: 'p2prc rm' ends it
    jobs = json.loads(p2prc(host["me"], "jobs", "ls", "--json").stdout)
    assert [j["state"] for j in jobs] == ["lost"] and "killed" in jobs[0]["message"], jobs
    assert p2prc(host["me"], "rm", box[:12]).returncode == 0
    assert host_ids(host) == set()


def test_a_create_answered_over_another_way_than_the_first_is_checked_and_kept(
        host: dict[str, Any]) -> None:
    """The first way to a host does not answer (a restarted relay, an address gone) and the
    second does: the request still named the first (its Host header), and the host's
    answer, which names that one, is checked against it, not refused as another address.
    (The soak found creates through a relay refused so.)"""
    from conftest import free_port
    from p2prc_core.client import PeerClient
    from p2prc_core.models import Endpoint
    from p2prc_core.sshkeys import ensure_key
    from p2prc_core.wire import ContainerRequest

    server = serve(host)
    ways = [Endpoint("127.0.0.2", free_port(), server.node_id),
            Endpoint("127.0.0.1", server.port, server.node_id)]
    identity = NodeIdentity.load_or_create(host["me"])
    _, public_key = ensure_key(host["me"])
    with PeerClient(ways, 20, identity=identity) as client:
        box = client.create_container(ContainerRequest(ssh_key=public_key))
        assert client.endpoint == ways[1] and client.named_host == "127.0.0.2"
    assert box.ssh is not None and box.ssh["host"] == "127.0.0.2"
    assert box.host == "127.0.0.1"  # where it was reached
    assert host_ids(host) == {box.id}
