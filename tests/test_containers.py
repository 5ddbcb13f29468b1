"""Containers against the real Docker engine: touch, ssh, ports, limits, hardening, leases."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import BUILTINS, P2PRC, LiveServer, free_port, require, start_server, web
from p2prc_core.client import PeerClient
from p2prc_core.config import Settings
from p2prc_core.containers import (
    LABEL,
    LABEL_NODE,
    ContainerError,
    ContainerRequest,
    ContainerService,
)
from p2prc_core.errors import PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.leases import ENDING_SECONDS
from p2prc_core.models import Endpoint
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.sshkeys import ensure_key
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]
IMAGE = "p2prc/base:latest"
HOST_KEY_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"
# Inside a container: wait (up to 30 s) until something listens on the port.
WAIT_FOR_PORT = ("python3 -c 'import socket, time\nfor _ in range(300):\n    try:\n"
                 "        socket.create_connection((\"127.0.0.1\", {port}), 1).close(); break\n"
                 "    except OSError: time.sleep(0.1)\nelse: raise SystemExit(1)'")


@pytest.fixture(scope="session")
def docker_client(engine: Any) -> Any:
    require(shutil.which("ssh") is not None, "the ssh client is missing")
    return engine


def p2prc_containers(client: Any, node_id: str) -> set[str]:
    """The p2prc containers that node ``node_id`` started: other test runs on the same
    engine may have theirs."""
    # The low-level call lists in one request: containers.list() inspects each one after,
    # and fails on one removed in between (the reaper at work).
    found = client.api.containers(all=True, filters={"label": f"{LABEL_NODE}={node_id}"})
    return {c["Id"] for c in found}


def node_of(server: LiveServer) -> str:
    return NodeIdentity.load_or_create(server.home).node_id


@pytest.fixture
def host(tmp_path: Path, docker_client: Any) -> Iterator[LiveServer]:
    """A real server that trusts the node whose home is tmp_path/'me'."""
    me = NodeIdentity.load_or_create(tmp_path / "me")
    server_home = tmp_path / "host"
    server_home.mkdir()
    TrustStore(server_home).add(me.node_id, "me")
    # Without the GPU plugin the host has no GPU, on any machine (GPU hosts are tested by
    # scripts and test_container_rules.py).
    server = start_server(server_home, env={"P2PRC_CONTAINER_PIDS": "64",
                                            "P2PRC_CONTAINERS_PER_CALLER": "3",
                                            "P2PRC_DISABLE_PLUGINS": "nvidia"})
    try:
        yield server
    finally:
        server.stop()
        for container_id in p2prc_containers(docker_client, node_of(server)):
            docker_client.containers.get(container_id).remove(force=True)


def me(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "P2PRC_HOME": str(tmp_path / "me"), **env})


def touch(tmp_path: Path, host: LiveServer, *args: str) -> dict[str, Any]:
    result = me(tmp_path, "touch", host.peer(), "--json", *args)
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def ssh(tmp_path: Path, container_id: str, command: str, timeout: float = 60,
        retry: bool = True) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + (15 if retry else 0)
    while True:  # sshd may still be binding its port right after start
        result = subprocess.run([P2PRC, "ssh", container_id[:12], command], capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
        if result.returncode != 255 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_touch_ssh_run_and_rm(tmp_path: Path, host: LiveServer, docker_client: Any) -> None:
    reply = touch(tmp_path, host, "--ports", "2")
    assert len(reply["ports"]) == 3 and reply["ports"][0]["internal"] == 22
    # Published on the host's loopback only: not for the client to dial, even here.
    assert reply["direct"] is False and reply["published_reachable"] is False
    assert reply["ssh"]["fingerprint"].startswith("SHA256:")
    assert reply["ssh"]["command"] == f"p2prc ssh {reply['id'][:12]}"
    listed = json.loads(me(tmp_path, "containers", "ls", "--json").stdout)
    assert [c["state"] for c in listed] == ["running"]
    result = ssh(tmp_path, reply["id"], "echo hello from $(hostname); id -u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["hello", "from", reply["id"][:12], "0"]
    known_hosts = tmp_path / "me" / "ssh" / f"known_hosts_{reply['id'][:12]}"
    assert known_hosts.exists()
    assert me(tmp_path, "rm", reply["id"][:12]).returncode == 0
    assert not known_hosts.exists()  # nothing of it is left behind
    assert reply["id"] not in p2prc_containers(docker_client, node_of(host))
    assert json.loads(me(tmp_path, "containers", "ls", "--json").stdout) == []


def test_the_pinned_host_key_is_checked(tmp_path: Path, host: LiveServer) -> None:
    reply = touch(tmp_path, host)
    tracked_path = tmp_path / "me" / "containers.json"
    tracked = json.loads(tracked_path.read_text())
    other = NodeIdentity.generate()  # any other ed25519 key stands in for an impostor
    from cryptography.hazmat.primitives import serialization
    fake = other.private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert ssh(tmp_path, reply["id"], "true").returncode == 0  # sshd is up, with its own key
    tracked[reply["id"]]["host_key"] = fake
    tracked_path.write_text(json.dumps(tracked))
    result = ssh(tmp_path, reply["id"], "true", retry=False)
    assert result.returncode == 255
    assert "host key" in result.stderr.lower()


def test_original_spellings_touch_tc_rm(tmp_path: Path, host: LiveServer) -> None:
    result = me(tmp_path, "--touch", host.peer(), "--ports", "1")
    assert result.returncode == 0, result.stderr
    container_id = json.loads(result.stdout)["id"]
    assert container_id[:12] in me(tmp_path, "--tc").stdout
    assert me(tmp_path, "--rm", container_id[:12]).returncode == 0


def test_groups_stand_for_their_containers(tmp_path: Path, host: LiveServer,
                                           docker_client: Any) -> None:
    first, second = touch(tmp_path, host), touch(tmp_path, host)
    assert me(tmp_path, "group", "create", "pair").returncode == 0
    assert me(tmp_path, "group", "add", "pair", first["id"][:12],
              second["id"][:12]).returncode == 0
    groups = json.loads(me(tmp_path, "group", "ls", "--json").stdout)
    assert groups == {"pair": [first["id"], second["id"]]}
    assert me(tmp_path, "rm", "pair").returncode == 0
    assert not {first["id"], second["id"]} & p2prc_containers(docker_client, node_of(host))
    assert json.loads(me(tmp_path, "group", "ls", "--json").stdout) == {"pair": []}


def test_a_memory_hog_is_stopped_and_the_server_keeps_answering(
        tmp_path: Path, host: LiveServer) -> None:
    reply = touch(tmp_path, host, "--memory", "64M")
    hog = ssh(tmp_path, reply["id"],
              "python3 -c 'x = bytearray(400 * 1024 * 1024); print(len(x))'; echo exit=$?")
    assert "exit=137" in hog.stdout or "MemoryError" in hog.stderr, (hog.stdout, hog.stderr)
    assert str(400 * 1024 * 1024) not in hog.stdout
    assert web.get(host.url() + "/v1/health", timeout=5).status_code == 200
    # The container itself survives its process being killed.
    assert ssh(tmp_path, reply["id"], "echo alive").stdout.strip() == "alive"


FORK = ("python3 -c \"import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        print('stopped at', n); break\n    if pid == 0:\n"
        "        os.closerange(0, 3); time.sleep(20); os._exit(0)\n    n += 1\"")


def test_a_fork_bomb_is_stopped_by_the_process_limit(tmp_path: Path, host: LiveServer) -> None:
    reply = touch(tmp_path, host)
    bomb = ssh(tmp_path, reply["id"], FORK)
    assert "stopped at" in bomb.stdout, (bomb.stdout, bomb.stderr)
    forked = int(bomb.stdout.split()[-1])
    assert 0 < forked < 64  # P2PRC_CONTAINER_PIDS
    assert web.get(host.url() + "/v1/health", timeout=5).status_code == 200


def test_hardening(tmp_path: Path, host: LiveServer, docker_client: Any) -> None:
    reply = touch(tmp_path, host, "--cpus", "0.5", "--memory", "128M")
    config = docker_client.api.inspect_container(reply["id"])["HostConfig"]
    assert config["Privileged"] is False
    assert config["CapDrop"] == ["ALL"]
    assert set(config["CapAdd"]) <= {"CHOWN", "SETUID", "SETGID", "SYS_CHROOT",
                                     "NET_BIND_SERVICE", "KILL", "AUDIT_WRITE"}
    assert "no-new-privileges:true" in config["SecurityOpt"]
    assert config["PidsLimit"] == 64
    assert config["Memory"] == 128 * 1024 * 1024
    assert config["NanoCpus"] == 500_000_000
    assert not config.get("Binds") and not config.get("Mounts")
    assert config["NetworkMode"] == "p2prc" and config["PidMode"] == ""
    assert config["IpcMode"] == "private"
    mounts = docker_client.api.inspect_container(reply["id"])["Mounts"]
    assert not any("docker.sock" in m.get("Source", "") for m in mounts)
    caps = ssh(tmp_path, reply["id"], "grep CapEff /proc/self/status")
    assert int(caps.stdout.split()[-1], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN


PROBE = ("python3 -c 'import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], "
         "int(sys.argv[2])), 5).close(); print(\"open\")\nexcept OSError as err: "
         "print(\"closed\", err)' {host} {port}")


def test_containers_reach_neither_the_hosts_api_nor_each_other(
        tmp_path: Path, host: LiveServer, docker_client: Any) -> None:
    first, second = touch(tmp_path, host), touch(tmp_path, host)
    networks = docker_client.api.inspect_container(first["id"])["NetworkSettings"]["Networks"]
    [(name, network)] = networks.items()
    assert name == "p2prc"
    gateway = network["Gateway"]
    other = docker_client.api.inspect_container(
        second["id"])["NetworkSettings"]["Networks"]["p2prc"]["IPAddress"]
    # The host's p2prc API, through the bridge's gateway and through loopback's twin, the
    # host's other bridge: refused. Another lease's sshd: unreachable.
    for target, port in ((gateway, host.port), (gateway, 22), (other, 22)):
        probe = ssh(tmp_path, first["id"], PROBE.format(host=target, port=port))
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.startswith("closed"), (target, port, probe.stdout)
    # Its own published ports still work from outside: that is how its owner gets in.
    assert ssh(tmp_path, second["id"], "true").returncode == 0


@pytest.fixture
def signed_client(tmp_path: Path, host: LiveServer) -> Iterator[PeerClient]:
    identity = NodeIdentity.load_or_create(tmp_path / "me")
    with PeerClient(Endpoint("127.0.0.1", host.port), timeout=60, identity=identity) as client:
        yield client


def key(tmp_path: Path) -> str:
    return ensure_key(tmp_path / "me")[1]


def sent_as_is(client: PeerClient, body: dict[str, Any]) -> None:
    """A create with ``body`` exactly as written, for the host alone to check (p2prc's own
    client refuses a malformed request before sending it; any other client may not)."""
    client.signed("POST", "/v1/containers", body)


@pytest.mark.parametrize("extra", [{"privileged": True}, {"volumes": ["/:/host"]},
                                   {"network_mode": "host"}, {"pid_mode": "host"},
                                   {"cap_add": ["SYS_ADMIN"]}, {"command": "sh"}])
def test_no_other_docker_option_can_be_passed(tmp_path: Path, signed_client: PeerClient,
                                              extra: dict[str, Any]) -> None:
    with pytest.raises(PeerRefused) as caught:
        sent_as_is(signed_client, {"ssh_key": key(tmp_path), **extra})
    assert caught.value.status == 400 and "Unknown fields" in str(caught.value)


@pytest.mark.parametrize("body, status, words", [
    ({"image": "../../etc"}, 400, "not a valid image"),
    ({"image": "debian:bookworm"}, 422, "offers p2prc/base:latest"),
    ({"cpus": 64}, 422, "limit of 2"),
    ({"memory": 1 << 40}, 422, "limit of"),
    ({"memory": 1}, 422, "below this host's minimum"),  # the engine would refuse it: no 500
    ({"ports": 99}, 422, "limit of 8"),
    ({"ttl": 10**9}, 422, "limit of"),
    ({"ports": -1}, 400, "from 0 up"),
    ({"gpu": "yes"}, 400, "true or false"),
    ({"ssh_key": "not a key"}, 400, "OpenSSH public key"),
    ({"gpu": True}, 409, "no NVIDIA GPU"),
])
def test_requests_over_limits_or_malformed(tmp_path: Path, host: LiveServer,
                                           signed_client: PeerClient, docker_client: Any,
                                           body: dict[str, Any], status: int, words: str) -> None:
    before = p2prc_containers(docker_client, node_of(host))
    with pytest.raises(PeerRefused) as caught:
        sent_as_is(signed_client, {"ssh_key": key(tmp_path), **body})
    assert caught.value.status == status and words in str(caught.value)
    assert p2prc_containers(docker_client, node_of(host)) == before  # nothing left behind


def test_too_many_containers_is_429(tmp_path: Path, signed_client: PeerClient) -> None:
    for _ in range(3):  # P2PRC_CONTAINERS_PER_CALLER
        signed_client.create_container(ContainerRequest(ssh_key=key(tmp_path)))
    with pytest.raises(PeerRefused) as caught:
        signed_client.create_container(ContainerRequest(ssh_key=key(tmp_path)))
    assert caught.value.status == 429 and "limit per caller" in str(caught.value)


def test_only_p2prc_containers_of_the_caller_can_be_touched(
        tmp_path: Path, host: LiveServer, signed_client: PeerClient, docker_client: Any) -> None:
    stranger = docker_client.containers.create(IMAGE, command=["true"])
    try:
        for target in (stranger.id, stranger.id[:12]):
            with pytest.raises(PeerRefused) as caught:
                signed_client.remove_container(target)
            assert caught.value.status == 404
        docker_client.containers.get(stranger.id)  # untouched
    finally:
        stranger.remove(force=True)
    mine = signed_client.create_container(ContainerRequest(ssh_key=key(tmp_path)))
    other = NodeIdentity.generate()
    TrustStore(host.home).add(other.node_id)
    with PeerClient(Endpoint("127.0.0.1", host.port), identity=other) as intruder:
        with pytest.raises(PeerRefused) as caught:
            intruder.remove_container(mine.id)
        assert caught.value.status == 404 and mine.id[:12] not in str(caught.value)
        assert intruder.list_containers() == []
    with pytest.raises(PeerRefused) as caught:
        signed_client.remove_container("not-hex-at-all")
    assert caught.value.status == 400


def test_an_untrusted_caller_cannot_start_one(tmp_path: Path, host: LiveServer) -> None:
    with PeerClient(Endpoint("127.0.0.1", host.port),
                    identity=NodeIdentity.generate()) as stranger:
        with pytest.raises(PeerRefused) as caught:
            stranger.create_container(ContainerRequest(ssh_key=key(tmp_path)))
    assert caught.value.status == 403


def test_the_host_sees_and_kills_every_container(tmp_path: Path, host: LiveServer,
                                                 docker_client: Any) -> None:
    reply = touch(tmp_path, host)
    env = {**os.environ, "P2PRC_HOME": str(host.home)}
    listed = subprocess.run([P2PRC, "server", "containers", "ls", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    leases = json.loads(listed.stdout)
    assert [lease["id"] for lease in leases] == [reply["id"]]
    assert leases[0]["owner"] == NodeIdentity.load_or_create(tmp_path / "me").node_id
    # Live use, as 'docker stats' shows it: a busy loop is seen using a CPU.
    busy = ssh(tmp_path, reply["id"], "nohup sh -c 'while :; do :; done' >/dev/null 2>&1 &")
    assert busy.returncode == 0, busy.stderr
    deadline = time.monotonic() + 30
    while True:
        listed = subprocess.run([P2PRC, "server", "containers", "ls", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        usage = json.loads(listed.stdout)[0]["usage"]
        if usage["cpu_percent"] > 25 or time.monotonic() > deadline:
            break
    # An idle container shows about 0 %; a busy loop, a good part of a CPU even when this
    # machine is loaded.
    assert usage["cpu_percent"] > 25 and 0 < usage["memory"] < leases[0]["memory"], usage
    table = subprocess.run([P2PRC, "server", "containers", "ls"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert "% of 1" in table.stdout and " of 512 MiB" in table.stdout
    short = subprocess.run([P2PRC, "server", "containers", "kill", "ab"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "at least 4 characters" in short.stderr
    assert len(short.stderr.strip().splitlines()) == 1  # one line, no usage block
    # A prefix works, as for 'p2prc rm'; the owner is named as 'ls' names it.
    kill = subprocess.run([P2PRC, "server", "containers", "kill", reply["id"][:4]], env=env,
                          capture_output=True, text=True, timeout=60)
    assert kill.returncode == 0 and f"killed {reply['id'][:12]} (owner me (" in kill.stdout
    assert reply["id"] not in p2prc_containers(docker_client, node_of(host))
    gone = json.loads(me(tmp_path, "containers", "ls", "--json").stdout)
    assert [c["state"] for c in gone] == ["gone"]


def test_a_running_server_reaps_an_expired_container(tmp_path: Path,
                                                     docker_client: Any) -> None:
    me_id = NodeIdentity.load_or_create(tmp_path / "me").node_id
    TrustStore(tmp_path / "reaper").add(me_id)
    server = start_server(tmp_path / "reaper", env={"P2PRC_REAP_SECONDS": "0.5"})
    try:
        reply = touch(tmp_path, server, "--ttl", "2s")
        assert reply["id"] in p2prc_containers(docker_client, node_of(server))
        deadline = time.monotonic() + 20
        running = p2prc_containers(docker_client, node_of(server))
        while reply["id"] in running and time.monotonic() < deadline:
            time.sleep(0.3)
            running = p2prc_containers(docker_client, node_of(server))
        assert reply["id"] not in p2prc_containers(docker_client, node_of(server)), server.output()
        assert "expired and was removed" in server.output()
        listed = json.loads(me(tmp_path, "containers", "ls", "--json").stdout)
        assert [c["state"] for c in listed] == ["expired"]  # not just "gone": its lease ran out
    finally:
        server.stop()


def test_a_container_whose_main_process_died_is_freed_after_its_grace(
        tmp_path: Path, docker_client: Any) -> None:
    from p2prc_core.containers import ContainerStore

    me_id = NodeIdentity.load_or_create(tmp_path / "me").node_id
    TrustStore(tmp_path / "host").add(me_id)
    server = start_server(tmp_path / "host", env={
        "P2PRC_REAP_SECONDS": "0.5", "P2PRC_CONTAINER_EXITED_GRACE": "1",
        "P2PRC_CONTAINERS_PER_CALLER": "1", "P2PRC_DISABLE_PLUGINS": "nvidia"})
    try:
        reply = touch(tmp_path, server, "--ports", "1")
        docker_client.containers.get(reply["id"]).kill()  # its PID 1 dies, as by the OOM killer
        deadline = time.monotonic() + 30
        while reply["id"] in p2prc_containers(docker_client, node_of(server)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert reply["id"] not in p2prc_containers(docker_client, node_of(server)), \
            server.output()
        assert ContainerStore(server.home, (42000, 42999)).held_ports() == {}
        assert f"container {reply['id'][:12]}" in server.output()
        lines = [line for line in server.output().splitlines() if reply["id"][:12] in line]
        assert len(lines) == 1 and "stopped" in lines[0], lines
        listed = json.loads(me(tmp_path, "containers", "ls", "--json").stdout)
        assert [c["state"] for c in listed] == ["gone"]
        again = touch(tmp_path, server)  # its place (one per caller here) is free again
        assert again["id"] != reply["id"]
    finally:
        server.stop()
        for container_id in p2prc_containers(docker_client, node_of(server)):
            docker_client.containers.get(container_id).remove(force=True)


def test_the_host_sees_a_stopped_container_and_when_it_will_be_freed(
        tmp_path: Path, docker_client: Any) -> None:
    svc = service(tmp_path, container_exited_grace=600)
    stopped = svc.create("a" * 26, ContainerRequest(ssh_key=key(tmp_path), ports=1))
    running = svc.create("a" * 26, ContainerRequest(ssh_key=key(tmp_path)))
    try:
        docker_client.containers.get(stopped.id).kill()
        deadline = time.monotonic() + 30
        while docker_client.containers.get(stopped.id).status != "exited" and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert svc.reap() == []  # seen stopped: its grace starts
        env = {**os.environ, "P2PRC_HOME": str(tmp_path), "P2PRC_CONTAINER_EXITED_GRACE": "10m"}
        table = subprocess.run([P2PRC, "server", "containers", "ls"], env=env,
                               capture_output=True, text=True, timeout=60)
        rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
        assert re.search(r" exited \d+s ago, freed in [\d.]+ min ", rows[stopped.id[:12]]), \
            table.stdout
        assert "running" in rows[running.id[:12]], table.stdout
        assert "container_exited_grace" in table.stdout  # how the host may free it now
        listed = json.loads(subprocess.run(
            [P2PRC, "server", "containers", "ls", "--json"], env=env, capture_output=True,
            text=True, timeout=60).stdout)
        found = {lease["id"]: lease for lease in listed}
        assert found[stopped.id]["state"] == "exited"
        assert found[stopped.id]["freed_at"] == pytest.approx(time.time() + 600, abs=30)
        assert found[running.id]["freed_at"] is None
        svc.reap(now=time.time() + 601)
        assert stopped.id not in p2prc_containers(docker_client, svc.node_id)
        assert set(svc.store.held_ports().values()) == {running.id}
    finally:
        for container_id in p2prc_containers(docker_client, svc.node_id):
            docker_client.containers.get(container_id).remove(force=True)


def test_a_place_given_back_frees_the_caller_at_once_and_the_reaper_removes_what_is_left(
        tmp_path: Path, docker_client: Any) -> None:
    """``give_back`` (what an exec's end does before the host removes its container): the
    caller, who may hold one container here, may start the next at once; the container it
    gave back keeps its port until it is removed, so the next never gets that port; and if
    its removal never comes (the engine failed, the process died), the reaper removes it
    once ENDING_SECONDS have passed, and frees the port; while the engine fails, it keeps
    the lease (a container with none would be adopted back by its caller at a restart).
    Another caller cannot give back what is not theirs."""
    svc = service(tmp_path, containers_per_caller=1)
    owner = "a" * 26
    first = svc.create(owner, ContainerRequest(ssh_key=key(tmp_path), ports=1))
    try:
        with pytest.raises(ContainerError) as refused:
            svc.create(owner, ContainerRequest(ssh_key=key(tmp_path)))
        assert refused.value.status == 429
        with pytest.raises(ContainerError) as other:
            svc.give_back(first.id, "b" * 26)
        assert other.value.status == 404
        svc.give_back(first.id, owner)
        assert svc.list_leases(owner) == []  # the caller holds nothing here now
        second = svc.create(owner, ContainerRequest(ssh_key=key(tmp_path), ports=1))
        held = svc.store.held_ports()
        mine = {int(p["external"]) for p in first.ports}
        assert {held[p] for p in mine} == {first.id}  # still its own
        assert not mine & {int(p["external"]) for p in second.ports}
        assert first.id in p2prc_containers(docker_client, svc.node_id)
        assert first.id not in svc.reap()  # its removal has ENDING_SECONDS to come first
        later = time.time() + ENDING_SECONDS + 1
        remove = svc.backend.remove

        def engine_fails(container_id: str) -> None:
            raise ContainerError(500, "Engine error", "the engine failed")

        svc.backend.remove = engine_fails  # type: ignore[method-assign]
        svc.reap(now=later)  # the engine fails: the lease is kept to try again, never left
        assert first.id in {lease.id for lease in svc.store.leases()}  # for its caller to adopt
        svc.backend.remove = remove  # type: ignore[method-assign]
        assert first.id in svc.reap(now=later)
        assert first.id not in p2prc_containers(docker_client, svc.node_id)
        assert set(svc.store.held_ports().values()) == {second.id}
    finally:
        for container_id in p2prc_containers(docker_client, svc.node_id):
            docker_client.containers.get(container_id).remove(force=True)


def service(home: Path, node_id: str | None = None, **options: Any) -> ContainerService:
    """The service over the real Docker backend, as a node of its own (a fresh id unless
    given), so that other test runs on the same engine are not in its way."""
    hooks = make_plugin_manager(load_entrypoints=False, plugins=[
        *BUILTINS, ("docker", __import__("p2prc_plugins.docker", fromlist=["x"]))])
    settings = Settings(port_range="42500-42599", **options)
    return ContainerService.open(settings, hooks.backends()["docker"], home,
                                 node_id or NodeIdentity.generate().node_id)


def test_twenty_cycles_leak_no_container_port_or_network(tmp_path: Path,
                                                         docker_client: Any) -> None:
    svc = service(tmp_path, containers_per_caller=2)
    svc.backend.network()  # p2prc's one network, made once (by whichever create comes first)
    networks = len(docker_client.networks.list())
    before = p2prc_containers(docker_client, svc.node_id)
    request = ContainerRequest(ssh_key=key(tmp_path), ports=2)
    for _ in range(20):
        lease = svc.create("a" * 26, request)
        svc.remove(lease.id, "a" * 26)
    assert p2prc_containers(docker_client, svc.node_id) == before
    assert svc.store.held_ports() == {} and svc.store.leases() == []
    assert len(docker_client.networks.list()) == networks


def test_the_per_caller_limit_holds_under_concurrent_creates(tmp_path: Path,
                                                            docker_client: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    svc = service(tmp_path, containers_per_caller=2)
    request = ContainerRequest(ssh_key=key(tmp_path), ports=1)

    def create(_: int) -> str:
        try:
            return svc.create("a" * 26, request).id
        except ContainerError as err:
            return f"refused {err.status}"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(create, range(6)))
    started = [o for o in outcomes if not o.startswith("refused")]
    assert len(started) == 2 and outcomes.count("refused 429") == 4, outcomes
    assert p2prc_containers(docker_client, svc.node_id) == set(started)
    ports = svc.store.held_ports()
    assert len(ports) == 4 and set(ports.values()) == set(started)  # ssh + 1 each, no more
    for container_id in started:
        svc.remove(container_id, "a" * 26)
    assert svc.store.held_ports() == {}


def test_a_failed_create_releases_its_ports_and_leaves_nothing(tmp_path: Path,
                                                               docker_client: Any) -> None:
    base = docker_client.containers.create(IMAGE, command=["true"])
    broken = base.commit("p2prc/broken", "test", changes=['CMD ["/bin/false"]'])
    base.remove()
    try:
        svc = service(tmp_path, container_images=["p2prc/broken:test", "p2prc/none:1"])
        before = p2prc_containers(docker_client, svc.node_id)
        for image, words in (("p2prc/broken:test", "exited before sshd"),
                             ("p2prc/none:1", "not on this host")):
            with pytest.raises(ContainerError, match=words):
                svc.create("a" * 26, ContainerRequest(ssh_key=key(tmp_path), ports=3,
                                                       image=image))
            assert svc.store.held_ports() == {} and svc.store.leases() == []
            assert p2prc_containers(docker_client, svc.node_id) == before
    finally:
        docker_client.images.remove(broken.id, force=True)


def test_expired_leases_are_reaped(tmp_path: Path, docker_client: Any) -> None:
    svc = service(tmp_path)
    lease = svc.create("a" * 26, ContainerRequest(ssh_key=key(tmp_path), ttl=120))
    assert svc.reap() == []
    assert svc.reap(now=time.time() + 121) == [lease.id]
    assert lease.id not in p2prc_containers(docker_client, svc.node_id)
    assert svc.store.held_ports() == {}
    # A create that died half-way (its place and ports held) is cleared once its place
    # runs out, and no longer counts against its caller.
    svc.store.reserve("b" * 26, 2, 1, "pending-crashed")
    assert svc.reap() == [] and len(svc.store.held_ports()) == 2
    assert svc.reap(now=time.time() + 601) == [] and svc.store.held_ports() == {}
    svc.store.reserve("b" * 26, 1, 1, "pending-next")  # the caller's one place is free again


def test_a_restarted_server_finds_its_containers_by_label(tmp_path: Path,
                                                          docker_client: Any) -> None:
    svc = service(tmp_path)
    lease = svc.create("a" * 26, ContainerRequest(ssh_key=key(tmp_path), ports=1))
    (tmp_path / "server.db").unlink()  # the state is lost; the engine still runs it
    for leftover in tmp_path.glob("server.db-*"):
        leftover.unlink()
    again = service(tmp_path, node_id=svc.node_id)
    assert again.reconcile() == {"adopted": [lease.id], "dropped": []}
    [found] = again.list_leases("a" * 26)
    assert found.ports == lease.ports and int(found.expires) == int(lease.expires)
    assert set(again.store.held_ports()) == {p["external"] for p in lease.ports}
    again.remove(lease.id, "a" * 26)
    assert again.reconcile() == {"adopted": [], "dropped": []}


def test_images_route_lists_the_offered_image(host: LiveServer) -> None:
    images = web.get(host.url() + "/v1/images", timeout=10).json()["images"]
    assert [(i["backend"], i["name"]) for i in images] == [("docker", IMAGE)]


# -- tunnels through the host's p2prc port --------------------------------------------------

def test_ssh_goes_through_the_hosts_p2prc_port(tmp_path: Path, host: LiveServer) -> None:
    reply = touch(tmp_path, host)
    result = ssh(tmp_path, reply["id"], "hostname")
    assert result.returncode == 0 and result.stdout.strip() == reply["id"][:12], result.stderr
    # The host joined an upgraded request on its own port to the container's sshd.
    assert f"tunnel to {reply['id'][:12]} port 22" in host.output()
    # Everything after the container is the remote command, options too.
    flags = subprocess.run([P2PRC, "ssh", reply["id"][:12], "uname", "-a"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                           env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    assert flags.returncode == 0 and flags.stdout.startswith("Linux "), flags.stderr


def test_forward_serves_a_containers_port_locally(tmp_path: Path, host: LiveServer) -> None:
    reply = touch(tmp_path, host, "--ports", "1")
    port = reply["ports"][1]["internal"]
    started = ssh(tmp_path, reply["id"], f"cd /etc && (setsid python3 -m http.server {port} "
                                         f">/dev/null 2>&1 </dev/null &); "
                                         + WAIT_FOR_PORT.format(port=port))
    assert started.returncode == 0, started.stderr
    proc = subprocess.Popen([P2PRC, "forward", reply["id"][:12], str(port), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()  # printed once it listens
        assert address.startswith("127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
        for _ in range(3):  # each request is its own stream
            answer = web.get(f"http://{address}/hostname", timeout=10)
            assert answer.status_code == 200 and answer.text.strip() == reply["id"][:12]
    finally:
        proc.terminate()
        proc.wait(10)
    refused = me(tmp_path, "forward", reply["id"][:12], "9")
    assert refused.returncode == 1 and "not 9" in refused.stderr


def test_a_tunnel_is_only_for_the_containers_owner_and_its_ports(
        tmp_path: Path, host: LiveServer, signed_client: PeerClient) -> None:
    import asyncio

    from p2prc_core.tunnel_streams import open_stream

    mine = signed_client.create_container(ContainerRequest(ssh_key=key(tmp_path)))
    path = f"/v1/containers/{mine.id}/tunnel"
    at = [Endpoint("127.0.0.1", host.port, host.node_id)]

    def opened(identity: NodeIdentity, query: str) -> bytes:
        async def go() -> bytes:
            reader, writer, first, _ = await open_stream(at, identity, path, query, 10)
            first += await asyncio.wait_for(reader.read(64), 10)  # sshd speaks first
            writer.close()
            return first
        return asyncio.run(go())

    assert opened(NodeIdentity.load_or_create(tmp_path / "me"), "port=22").startswith(b"SSH-2.0")
    other = NodeIdentity.generate()
    TrustStore(host.home).add(other.node_id)
    with pytest.raises(PeerRefused) as caught:
        opened(other, "port=22")
    assert caught.value.status == 404  # as for a container that does not exist
    with pytest.raises(PeerRefused) as caught:
        opened(NodeIdentity.load_or_create(tmp_path / "me"), "port=8080")
    assert caught.value.status == 400 and "not 8080" in str(caught.value)
    # A plain request (no Upgrade) is refused, not hung.
    with pytest.raises(PeerRefused) as caught:
        signed_client.signed("POST", path)
    assert caught.value.status == 400 and "Upgrade" in str(caught.value)


def test_a_tunnel_through_a_relay_reaches_the_containers_sshd(
        tmp_path: Path, docker_client: Any) -> None:
    """A host that only a relay reaches: SSH's stream goes client -> relay -> host ->
    container, TLS to the host inside the relay's TLS."""
    import asyncio

    from p2prc_core.tunnel_streams import open_stream

    me_id = NodeIdentity.load_or_create(tmp_path / "me")
    relay = start_server(tmp_path / "relay", env={"P2PRC_RELAY": "true",
                                                  "P2PRC_RELAY_OPEN": "true"})
    host_home = tmp_path / "host"
    host_home.mkdir()
    TrustStore(host_home).add(me_id.node_id)
    host = start_server(host_home, env={"P2PRC_USE_RELAY": "always", "P2PRC_DISABLE_PLUGINS":
                                        "nvidia",
                                        "P2PRC_RELAYS": f"{relay.node_id}@127.0.0.1:"
                                                        f"{relay.port}"})
    try:
        deadline = time.monotonic() + 20
        while not any((relay.home / "relay").glob(f"w.{host.node_id}.*")):
            assert time.monotonic() < deadline, "the host never waited at the relay"
            time.sleep(0.05)
        through = Endpoint("127.0.0.1", relay.port, host.node_id, False, relay.node_id)
        with PeerClient([through], timeout=60, identity=me_id) as client:
            container = client.create_container(ContainerRequest(ssh_key=key(tmp_path)))

        async def banner() -> bytes:
            reader, writer, first, used = await open_stream(
                [through], me_id, f"/v1/containers/{container.id}/tunnel", "port=22", 20)
            assert used.relay == relay.node_id
            while b"\n" not in first:
                first += await asyncio.wait_for(reader.read(64), 10)
            writer.close()
            return first

        assert asyncio.run(banner()).startswith(b"SSH-2.0")
    finally:
        host.stop()
        relay.stop()
        for container_id in p2prc_containers(docker_client, host.node_id):
            docker_client.containers.get(container_id).remove(force=True)


def test_open_tunnels_hold_no_thread_of_the_host(
        tmp_path: Path, host: LiveServer, signed_client: PeerClient) -> None:
    """SSH sessions kept open (ControlPersist, VS Code) are tunnels that last: nine at once
    (sshd's MaxStartups drops unauthenticated connections beyond ten), more than one
    worker's threads allowed (its 8 threads, two kept for requests), all reach sshd, the
    host answers meanwhile, and its threads do not grow with them."""
    import asyncio

    import psutil

    from p2prc_core.tunnel_streams import open_stream

    mine = signed_client.create_container(ContainerRequest(ssh_key=key(tmp_path)))
    at = [Endpoint("127.0.0.1", host.port, host.node_id)]
    me_id = NodeIdentity.load_or_create(tmp_path / "me")
    process = psutil.Process(host.proc.pid)

    def threads() -> int:
        return sum(p.num_threads() for p in [process, *process.children(recursive=True)])

    async def hold_nine() -> tuple[list[bytes], int, float]:
        opened = [await open_stream(at, me_id, f"/v1/containers/{mine.id}/tunnel",
                                    "port=22", 20) for _ in range(9)]
        banners = []
        for reader, _, first, _ in opened:
            while b"\n" not in first:
                first += await asyncio.wait_for(reader.read(64), 10)
            banners.append(first)
        held = threads()
        started = time.monotonic()
        answered = await asyncio.to_thread(signed_client.health)
        assert answered is not None
        took = time.monotonic() - started
        for _, writer, _, _ in opened:
            writer.close()
        return banners, held, took

    before = threads()
    banners, held, took = asyncio.run(hold_nine())
    assert all(b.startswith(b"SSH-2.0") for b in banners), [b for b in banners
                                                           if not b.startswith(b"SSH-2.0")]
    assert held <= before + 2, (before, held)  # (the tunnels' one loop thread)
    assert took < 2


def test_touch_says_when_published_ports_cannot_be_reached(tmp_path: Path) -> None:
    from p2prc_core.cli.containers import published_reachable
    from p2prc_core.my_containers import RemoteContainer

    closed = free_port()
    container = RemoteContainer(id="a" * 64, endpoint="127.0.0.1:8088", host="127.0.0.1",
                                ssh_port=closed, host_key=HOST_KEY_LINE, ports=[
                                    {"name": "ssh", "internal": 22, "external": closed}],
                                image=IMAGE, created=0, expires=1)
    assert published_reachable(container, timeout=0.5) is False


def test_ssh_config_lets_plain_ssh_and_scp_in_through_the_tunnel(tmp_path: Path,
                                                               host: LiveServer) -> None:
    reply = touch(tmp_path, host)
    short = reply["id"][:12]
    written = me(tmp_path, "ssh-config", "--write")
    assert written.returncode == 0 and "Include" in written.stdout, written.stderr
    config = tmp_path / "me" / "ssh" / "config"
    assert f"Host p2prc-{short}" in config.read_text()
    assert "ProxyCommand" in config.read_text() and "StrictHostKeyChecking yes" in \
        config.read_text()
    deadline = time.monotonic() + 15
    while True:  # plain OpenSSH, nothing but the config
        result = subprocess.run(["ssh", "-F", str(config), f"p2prc-{short}", "hostname"],
                                capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 255 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.returncode == 0 and result.stdout.strip() == short, result.stderr
    local = tmp_path / "note.txt"
    local.write_text("copied through the tunnel\n")
    copied = subprocess.run(["scp", "-F", str(config), str(local), f"p2prc-{short}:/tmp/"],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert copied.returncode == 0, copied.stderr
    back = subprocess.run(["ssh", "-F", str(config), f"p2prc-{short}", "cat /tmp/note.txt"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert back.stdout == "copied through the tunnel\n"


def test_a_container_removed_while_the_host_lists_them_is_left_out(engine: Any) -> None:
    """Another hand removes a container between the engine's list and its inspection of
    that container (a server starting while containers come and go): the listing leaves it
    out instead of failing, and so the server starts."""
    import docker

    from p2prc_plugins.docker import DockerBackend

    client = docker.from_env()
    doomed = client.containers.create("p2prc/base:latest", "true",
                                      labels={LABEL: "1", LABEL_NODE: "test-removed-race"})
    real = client.api.inspect_container
    removed = []

    def inspect_after_removal(container_id: str) -> Any:
        if container_id == doomed.id and not removed:
            client.api.remove_container(container_id, force=True)
            removed.append(container_id)
        return real(container_id)

    client.api.inspect_container = inspect_after_removal
    try:
        listed = DockerBackend(client).containers()
    finally:
        client.api.inspect_container = real
        if not removed:
            doomed.remove(force=True)
    assert removed == [doomed.id]
    assert doomed.id not in [c.id for c in listed]
