"""The host's warm pool against the real Docker engine: pooled containers are started before
anyone asks, each is handed to one caller only (its key, its limits), nothing of one caller
reaches the next, the pool refills, shows in 'server containers ls', and goes with the
server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from faultkit import wait_for

from conftest import P2PRC, LiveServer, require, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.sshkeys import ensure_key
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.docker, pytest.mark.integration]
CALLERS = ("me", "you")


@pytest.fixture(scope="session")
def docker_client(engine: Any) -> Any:
    require(shutil.which("ssh") is not None, "the ssh client is missing")
    return engine


def host_with_pool(tmp_path: Path, size: int) -> LiveServer:
    """A real server that trusts the callers me and you, with a warm pool of ``size``."""
    home = tmp_path / "host"
    home.mkdir(exist_ok=True)
    for caller in CALLERS:
        TrustStore(home).add(NodeIdentity.load_or_create(tmp_path / caller).node_id, caller)
    return start_server(home, env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                   "P2PRC_CONTAINER_WARM_POOL": str(size),
                                   "P2PRC_CONTAINERS_PER_CALLER": "2",
                                   "P2PRC_REAP_SECONDS": "1"})


def remove_all(docker_client: Any, node_id: str) -> None:
    for found in docker_client.api.containers(
            all=True, filters={"label": f"org.p2prc.node={node_id}"}):
        docker_client.api.remove_container(found["Id"], force=True)


@pytest.fixture
def pooled_host(tmp_path: Path, docker_client: Any) -> Iterator[LiveServer]:
    server = host_with_pool(tmp_path, 2)
    try:
        yield server
    finally:
        server.stop()
        remove_all(docker_client, server.node_id)


def p2prc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "P2PRC_HOME": str(home)})


def host_ls(server: LiveServer) -> list[dict[str, Any]]:
    result = p2prc(server.home, "server", "containers", "ls", "--json")
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def pool_ready(server: LiveServer, size: int = 2) -> list[str]:
    """The pooled containers' ids once ``size`` of them run, else []."""
    pooled = [c["id"] for c in host_ls(server) if c["pool"] and c["state"] == "running"]
    return pooled if len(pooled) == size else []


def touch(tmp_path: Path, server: LiveServer, caller: str, *args: str) -> dict[str, Any]:
    result = p2prc(tmp_path / caller, "touch", server.peer(), "--json", *args)
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def ssh_as(tmp_path: Path, caller: str, reply: dict[str, Any],
           command: str) -> subprocess.CompletedProcess[str]:
    """Plain ssh with ``caller``'s key to the container's SSH port as the host publishes it
    (on its loopback: this machine), so that only the key decides who gets in."""
    private, _ = ensure_key(tmp_path / caller)
    return subprocess.run(
        ["ssh", "-i", str(private), "-p", str(reply["ports"][0]["external"]),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "IdentitiesOnly=yes",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         "-o", "ConnectTimeout=10", "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def created(docker_client: Any, container_id: str) -> float:
    """When the engine created the container (seconds since the epoch)."""
    text = docker_client.api.inspect_container(container_id)["Created"]
    whole, _, fraction = text.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(whole + "+00:00").timestamp()
    return stamp + float(f"0.{fraction or 0}")


def test_two_callers_get_distinct_pooled_containers_with_nothing_of_the_other(
        tmp_path: Path, pooled_host: LiveServer, docker_client: Any) -> None:
    pooled = wait_for(lambda: pool_ready(pooled_host), what="a pool of 2")
    asked = time.time()
    mine = touch(tmp_path, pooled_host, "me", "--cpus", "0.5", "--memory", "256M")
    yours = touch(tmp_path, pooled_host, "you")
    # Each got a container of the pool, started before it asked; not the same one.
    assert mine["id"] != yours["id"] and {mine["id"], yours["id"]} == set(pooled)
    for reply in (mine, yours):
        assert created(docker_client, reply["id"]) < asked
    # The caller's limits were applied at hand-out, and its sessions are told them.
    config = docker_client.api.inspect_container(mine["id"])["HostConfig"]
    assert (config["CpuQuota"], config["CpuPeriod"], config["Memory"]) == \
        (50_000, 100_000, 256 << 20)
    # Each has its own key only: the other caller cannot log in.
    for caller, reply, other in (("me", mine, "you"), ("you", yours, "me")):
        own = ssh_as(tmp_path, caller, reply, "cat /root/.ssh/authorized_keys")
        assert own.returncode == 0, own.stderr
        assert own.stdout.split()[:2] == ensure_key(tmp_path / caller)[1].split()[:2]
        assert len(own.stdout.strip().splitlines()) == 1
        refused = ssh_as(tmp_path, other, reply, "true")
        assert refused.returncode == 255 and "denied" in refused.stderr.lower()
    assert ssh_as(tmp_path, "me", mine, "echo $P2PRC_CPUS $P2PRC_MEMORY").stdout.split() == \
        ["0.5", str(256 << 20)]
    # What one caller writes is in no other container.
    wrote = ssh_as(tmp_path, "me", mine, "echo secret > /root/mine; echo secret > /tmp/mine; "
                                         "echo secret > /job/mine; ls /root/mine /job/mine")
    assert wrote.returncode == 0, wrote.stderr
    seen = ssh_as(tmp_path, "you", yours, "ls -a /root /tmp /job; cat /root/mine || true")
    assert seen.returncode == 0 and "mine" not in seen.stdout, seen.stdout
    # The pool refills to 2 with new containers; the host sees each as the pool's.
    refilled = wait_for(lambda: pool_ready(pooled_host), what="the pool refilled")
    assert not set(refilled) & {mine["id"], yours["id"]}
    listed = {c["id"]: c for c in host_ls(pooled_host)}
    assert [listed[i]["owner"] for i in refilled] == ["pool", "pool"]
    assert listed[mine["id"]]["pool"] is False and listed[mine["id"]]["owner"] == \
        NodeIdentity.load_or_create(tmp_path / "me").node_id
    text = p2prc(pooled_host.home, "server", "containers", "ls").stdout
    assert "2 in the warm pool" in text
    # A caller sees only its own container, never the pool's.
    mine_listed = p2prc(tmp_path / "me", "containers", "ls", "--json")
    assert [c["id"] for c in json.loads(mine_listed.stdout)] == [mine["id"]]
    # Removed with its lease, like any other; never back to the pool.
    assert p2prc(tmp_path / "me", "rm", mine["id"][:12]).returncode == 0
    assert mine["id"] not in {c["Id"] for c in docker_client.api.containers(all=True)}


def test_a_request_the_pool_cannot_serve_gets_a_fresh_container(
        tmp_path: Path, pooled_host: LiveServer, docker_client: Any) -> None:
    pooled = wait_for(lambda: pool_ready(pooled_host), what="a pool of 2")
    asked = time.time()
    reply = touch(tmp_path, pooled_host, "me", "--ports", "1")  # pooled ones have SSH's only
    assert reply["id"] not in pooled and created(docker_client, reply["id"]) >= asked - 1
    assert ssh_as(tmp_path, "me", reply, "true").returncode == 0
    assert set(pool_ready(pooled_host)) == set(pooled)


def test_a_pooled_container_that_dies_is_replaced(tmp_path: Path, pooled_host: LiveServer,
                                                  docker_client: Any) -> None:
    first, second = wait_for(lambda: pool_ready(pooled_host), what="a pool of 2")
    docker_client.api.kill(first)
    again = wait_for(lambda: (lambda ids: ids if first not in ids else [])(
        pool_ready(pooled_host)), what="the dead one replaced")
    assert second in again
    wait_for(lambda: first not in {c["Id"] for c in docker_client.api.containers(all=True)},
             what="the dead one removed")


def test_a_restart_empties_the_pool_and_keeps_what_was_handed_out(
        tmp_path: Path, docker_client: Any) -> None:
    server = host_with_pool(tmp_path, 2)
    try:
        wait_for(lambda: pool_ready(server), what="a pool of 2")
        mine = touch(tmp_path, server, "me")
        left = wait_for(lambda: pool_ready(server), what="the pool refilled")
        server.stop()
        # The state is lost too: the owner is read back from the container itself.
        for path in server.home.glob("server.db*"):
            path.unlink()
        server = host_with_pool(tmp_path, 2)
        running = {c["Id"] for c in docker_client.api.containers(all=True)}
        assert not set(left) & running  # the last run's pool is gone at the start
        listed = {c["id"]: c for c in host_ls(server)}
        assert listed[mine["id"]]["owner"] == NodeIdentity.load_or_create(
            tmp_path / "me").node_id and not listed[mine["id"]]["pool"]
        assert ssh_as(tmp_path, "me", mine, "true").returncode == 0
        assert not set(wait_for(lambda: pool_ready(server), what="a new pool")) & set(left)
    finally:
        server.stop()
        remove_all(docker_client, server.node_id)


def test_a_host_without_a_pool_starts_each_container_when_asked(
        tmp_path: Path, docker_client: Any) -> None:
    server = host_with_pool(tmp_path, 0)
    try:
        asked = time.time()
        reply = touch(tmp_path, server, "me")
        assert created(docker_client, reply["id"]) >= asked - 1
        assert ssh_as(tmp_path, "me", reply, "true").returncode == 0
        assert [(c["id"], c["pool"]) for c in host_ls(server)] == [(reply["id"], False)]
    finally:
        server.stop()
        remove_all(docker_client, server.node_id)


def pool_service(tmp_path: Path, size: int) -> Any:
    """A container service over the real Docker backend with a warm pool of ``size``,
    filled, as a node of its own; the pool refills only when told (no thread left over)."""
    from conftest import BUILTINS
    from p2prc_core.config import Settings
    from p2prc_core.containers import ContainerService
    from p2prc_core.plugins import make_plugin_manager
    from p2prc_core.warm_pool import WarmPool

    hooks = make_plugin_manager(load_entrypoints=False, plugins=[
        *BUILTINS, ("docker", __import__("p2prc_plugins.docker", fromlist=["x"]))])
    service = ContainerService.open(Settings(port_range="42600-42699"),
                                    hooks.backends()["docker"], tmp_path,
                                    NodeIdentity.generate().node_id)
    pool = WarmPool(service, size)
    pool.refill_soon = lambda: None  # type: ignore[method-assign]
    service.pool = pool
    assert pool.refill() == size
    return service


def test_concurrent_callers_never_share_a_pooled_container(tmp_path: Path,
                                                           docker_client: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from p2prc_core.containers import POOL_OWNER, ContainerRequest

    service = pool_service(tmp_path, 2)
    try:
        pooled = {lease.id for lease in service.store.leases(POOL_OWNER)}
        request = ContainerRequest(ssh_key=ensure_key(tmp_path / "me")[1])
        owners = [chr(ord("a") + i) * 26 for i in range(4)]
        with ThreadPoolExecutor(4) as threads:
            leases = list(threads.map(lambda owner: service.create(owner, request), owners))
        ids = [lease.id for lease in leases]
        assert len(set(ids)) == 4 and len(pooled & set(ids)) == 2  # two pooled, two fresh
        assert [lease.owner for lease in leases] == owners
        assert service.store.leases(POOL_OWNER) == []
    finally:
        remove_all(docker_client, service.node_id)


def test_a_pooled_container_that_cannot_be_handed_out_gives_way_to_a_fresh_one(
        tmp_path: Path, docker_client: Any) -> None:
    from p2prc_core.containers import POOL_OWNER, ContainerRequest

    service = pool_service(tmp_path, 1)
    try:
        [dead] = [lease.id for lease in service.store.leases(POOL_OWNER)]
        docker_client.api.kill(dead)  # before the reaper sees it
        lease = service.create("a" * 26, ContainerRequest(ssh_key=ensure_key(tmp_path)[1]))
        assert lease.id != dead and lease.owner == "a" * 26
        assert dead not in {c["Id"] for c in docker_client.api.containers(all=True)}
        assert [x.id for x in service.store.leases()] == [lease.id]
        assert set(service.store.held_ports().values()) == {lease.id}
    finally:
        remove_all(docker_client, service.node_id)


def test_draining_the_pool_removes_what_waits_in_it(tmp_path: Path, docker_client: Any) -> None:
    from p2prc_core.containers import POOL_OWNER

    service = pool_service(tmp_path, 2)
    try:
        pooled = [lease.id for lease in service.store.leases(POOL_OWNER)]
        assert sorted(service.pool.drain()) == sorted(pooled)
        assert service.store.leases() == [] and service.store.held_ports() == {}
        assert not set(pooled) & {c["Id"] for c in docker_client.api.containers(all=True)}
    finally:
        remove_all(docker_client, service.node_id)


def test_a_request_for_another_image_never_gets_a_pooled_one(tmp_path: Path,
                                                             docker_client: Any) -> None:
    """Pooled containers run the default image: a caller who asks for another offered image
    gets a fresh container of it, never a pooled one of the default."""
    other = "p2prc-test/other-image:latest"
    docker_client.images.get("p2prc/base:latest").tag(other)
    home = tmp_path / "host"
    home.mkdir()
    TrustStore(home).add(NodeIdentity.load_or_create(tmp_path / "me").node_id, "me")
    server = start_server(home, env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                     "P2PRC_CONTAINER_WARM_POOL": "2",
                                     "P2PRC_CONTAINER_IMAGES": f"p2prc/base:latest,{other}",
                                     "P2PRC_REAP_SECONDS": "1"})
    try:
        pooled = wait_for(lambda: pool_ready(server), what="a pool of 2")
        reply = touch(tmp_path, server, "me", "--image", other)
        assert reply["id"] not in pooled
        assert docker_client.api.inspect_container(reply["id"])["Config"]["Image"] == other
    finally:
        server.stop()
        remove_all(docker_client, server.node_id)
        docker_client.images.remove(other)


@pytest.mark.docker
@pytest.mark.integration
def test_exec_in_a_pooled_container_sees_the_callers_limits(
        tmp_path: Path, pooled_host: LiveServer) -> None:
    """A pooled container started with the pool's limits in its environment; a command run
    by an exec stream sees the caller's (the cgroup is the caller's either way)."""
    wait_for(lambda: pool_ready(pooled_host), what="the pool fills")
    result = subprocess.run(
        [P2PRC, "exec", "--on", pooled_host.peer(), "--cpus", "0.5", "--memory", "300M", "--",
         "sh", "-c", "echo $P2PRC_CPUS $P2PRC_MEMORY $OMP_NUM_THREADS; nproc"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.5", str(300 << 20), "1", "1"], result.stdout


def test_the_hand_out_writes_the_caller_to_the_waiting_entry_script_and_nothing_else(
        tmp_path: Path, docker_client: Any) -> None:
    """``docker_pool.hand_out`` against real containers: one that waits on its input takes
    the caller's key and limits, then its sshd starts; one made by an earlier p2prc (stdin
    closed) or from an earlier image (it waits on a pipe) is refused at once, never left
    waiting for a key that cannot come; a line break in a line is refused before anything."""
    from p2prc_core.containers import ContainerError, HandOut
    from p2prc_plugins.docker import SSHD_LISTENING, DockerBackend
    from p2prc_plugins.docker_pool import hand_out

    key = ensure_key(tmp_path)[1]
    given = HandOut(owner="a" * 26, ssh_key=key, cpus=0.5, memory=256 << 20,
                    expires=time.time() + 600)
    made: list[Any] = []

    def pooled(stdin: bool, command: list[str] | None = None) -> Any:
        container = docker_client.containers.run(
            "p2prc/base:latest", command, detach=True, stdin_open=stdin,
            name=f"p2prc-pool-{os.urandom(6).hex()}", environment={"P2PRC_POOL": "1"},
            labels={"org.p2prc.test": "hand-out"}, cpu_period=100_000, cpu_quota=100_000)
        made.append(container)
        wait_for(lambda: b"P2PRC-POOL-WAITING" in container.logs(), 30, "it waits")
        return container

    try:
        waiting = pooled(True)
        started = time.monotonic()
        hand_out(docker_client, waiting.id, given)
        assert time.monotonic() - started < 5
        wait_for(lambda: SSHD_LISTENING in waiting.logs().decode(), 30, "sshd starts")
        waiting.reload()
        assert waiting.name.startswith("p2prc-") and f"-for-{'a' * 26}-until-" in waiting.name
        assert waiting.attrs["HostConfig"]["Memory"] == 256 << 20
        authorized = waiting.exec_run(["cat", "/root/.ssh/authorized_keys"]).output.decode()
        assert authorized == key.strip() + "\n"  # the key, and nothing of the other lines
        # Its limits reach every session through sshd's command line (ps's own width cut).
        shown = waiting.top(ps_args="-eo pid,args --cols 4000")["Processes"]
        sshd = " ".join(row[-1] for row in shown)
        assert f"P2PRC_CPUS=0.5 P2PRC_MEMORY={256 << 20} OMP_NUM_THREADS=1" in sshd, shown
        assert DockerBackend().host_key(waiting.id, 10) in waiting.logs().decode()

        for earlier in (pooled(False),  # by an earlier p2prc: its input is closed
                        pooled(True, ["sh", "-c", "echo P2PRC-POOL-WAITING; sleep 60"])):
            started = time.monotonic()
            with pytest.raises(ContainerError, match="does not read its caller"):
                hand_out(docker_client, earlier.id, given)
            assert time.monotonic() - started < 5
            earlier.reload()
            assert earlier.name.startswith("p2prc-pool-")  # nothing changed on it

        fresh = pooled(True)
        for bad in (key.strip() + "\nssh-ed25519 AAAA other", "ssh-ed25519 AAAA\rx"):
            with pytest.raises(ContainerError, match="not one printable line"):
                hand_out(docker_client, fresh.id, HandOut(
                    owner="a" * 26, ssh_key=bad, cpus=1, memory=256 << 20, expires=0))
        fresh.reload()
        assert fresh.name.startswith("p2prc-pool-") and \
            SSHD_LISTENING not in fresh.logs().decode()
    finally:
        for container in made:
            container.remove(force=True)
