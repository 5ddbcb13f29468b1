"""What a host says, and to whom: a host whose engine does not answer tells a friend only
that it cannot run containers now, and tells its owner the fix (log, doctor, status)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import netlab
import pytest

from conftest import P2PRC, LiveServer, require, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

pytestmark = pytest.mark.integration
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"


def p2prc(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "P2PRC_HOME": str(home), **env})


def test_a_host_without_an_engine_tells_the_friend_only_that_it_cannot_run_containers(
        tmp_path: Path) -> None:
    missing = f"unix://{tmp_path}/no-docker.sock"
    me = NodeIdentity.load_or_create(tmp_path / "me")
    host_home = tmp_path / "host"
    host_home.mkdir()
    TrustStore(host_home).add(me.node_id, "me")
    host = start_server(host_home, env={"DOCKER_HOST": missing,
                                        "P2PRC_DISABLE_PLUGINS": "nvidia"})
    try:
        touched = p2prc(tmp_path / "me", "touch", host.peer())
        # Beside its server, the host's status says what is wrong, and the fix.
        status = p2prc(host_home, "status", DOCKER_HOST=missing, P2PRC_PORT=str(host.port))
    finally:
        host.stop()
    assert "cannot run containers" in status.stdout and "DOCKER_HOST" in status.stdout
    assert "Connection aborted" not in status.stdout, status.stdout
    said = touched.stdout + touched.stderr
    assert touched.returncode == 1, said
    assert "cannot run containers now" in said, said
    for leak in ("dockerd", "docker-engine", "DOCKER_HOST", "no-docker.sock", "Errno",
                 "Traceback", "('", "FileNotFoundError", "Connection aborted"):
        assert leak not in said, (leak, said)
    log = host.output()  # the host's owner reads the fix in the server's log
    assert "does not answer at " + missing in log and "DOCKER_HOST" in log, log
    assert "Traceback" not in log


def test_doctor_names_docker_host_when_it_points_nowhere(tmp_path: Path) -> None:
    missing = f"unix://{tmp_path}/no-docker.sock"
    doctor = p2prc(tmp_path / "h", "doctor", "--json", DOCKER_HOST=missing)
    assert doctor.returncode == 1, doctor.stderr
    engine = {c["name"]: c for c in json.loads(doctor.stdout)}["container engine"]
    assert engine["result"] == "fail"
    assert missing in engine["detail"] and "no such socket" in engine["detail"]
    assert "DOCKER_HOST" in engine["fix"] and "('" not in engine["detail"]
    image = {c["name"]: c for c in json.loads(doctor.stdout)}["base image"]
    assert image["result"] == "skip"  # not "missing": nobody could be asked


def held_on_a_peer(home: Path, node_id: str) -> None:
    """The client keeps one container it holds on peer ``node_id`` (as ``touch`` keeps it)."""
    from p2prc_core.my_containers import RemoteContainer, Tracked

    now = time.time()
    Tracked(home).add(RemoteContainer(
        id="ab" * 32, endpoint="127.0.0.1:9", host="127.0.0.1", ssh_port=40022,
        host_key=HOST_KEY, ports=[{"name": "ssh", "internal": 22, "external": 40022}],
        image="p2prc/base:latest", created=now, expires=now + 3600, node_id=node_id))


def test_a_clients_status_reports_no_loopback_view_and_labels_whose_containers(
        tmp_path: Path, live_server: LiveServer) -> None:
    me = tmp_path / "me"
    assert p2prc(me, "peers", "add", live_server.peer()).returncode == 0
    held_on_a_peer(me, live_server.node_id)
    # The peer saw this client come from 127.0.0.1 (as a relay's streams do): that is not
    # how peers see it, and no NAT follows from it.
    env = {"P2PRC_ADVERTISE_ADDRESSES": "2001:db8::77"}
    state = json.loads(p2prc(me, "status", "--json", **env).stdout)
    assert state["observed"] == [] and state["behind_nat"] is False
    assert state["containers"]["hosting"] is False  # no server here: hosts nothing
    assert state["on_peers"] == {"containers": 1, "hosts": 1}
    table = p2prc(me, "status", **env).stdout
    assert "seen as" not in table and "behind NAT" not in table, table
    assert "1 container(s) on 1 peer(s)" in table and "no server runs here" in table, table


def test_loopback_and_link_local_are_not_how_peers_see_a_node() -> None:
    from p2prc_core.doctor import seen_by_peers

    observed = {"127.0.0.1": {"last": 1.0}, "::1": {"last": 1.0}, "fe80::1": {"last": 1.0},
                "0.0.0.0": {"last": 1.0}, "203.0.113.9": {"last": 2.0},
                "not an address": {"last": 1.0}, "198.51.100.1": {"last": "soon"}}
    assert list(seen_by_peers(observed, allow_loopback=False)) == ["203.0.113.9"]
    assert sorted(seen_by_peers(observed, allow_loopback=True)) == [
        "127.0.0.1", "203.0.113.9", "::1"]


@pytest.mark.netns
def test_with_ipv6_disabled_status_and_doctor_find_the_nodes_own_server(
        tmp_path: Path) -> None:
    why = netlab.available()
    require(why is None, why or "")
    namespace = f"p2prc-v6off-{secrets.token_hex(3)}"
    home = tmp_path / "node"
    home.mkdir()
    inside = ["ip", "netns", "exec", namespace]
    env = {**os.environ, "P2PRC_HOME": str(home), "P2PRC_UPNP": "false",
           "P2PRC_REFRESH_SECONDS": "0", "P2PRC_WORKERS": "1"}
    netlab.run("ip", "netns", "add", namespace)
    server = None
    try:
        netlab.run(*inside, "ip", "link", "set", "lo", "up")
        netlab.run(*inside, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                   "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1")
        with open(home / "server.log", "wb") as out:  # on '::', the default: IPv4 too
            server = subprocess.Popen([*inside, P2PRC, "server"], stdout=out,
                                      stderr=subprocess.STDOUT, env=env)
        answers = [*inside, sys.executable, "-c",
                   "import socket; socket.create_connection(('127.0.0.1', 8088), 1)"]
        deadline = time.monotonic() + 30
        while subprocess.run(answers, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, \
                (home / "server.log").read_text()
            time.sleep(0.1)
        status = subprocess.run([*inside, P2PRC, "status", "--json"], capture_output=True,
                                text=True, env=env, timeout=60)
        assert json.loads(status.stdout)["server"]["running"] is True, status.stdout
        doctor = subprocess.run([*inside, P2PRC, "doctor", "--json"], capture_output=True,
                                text=True, env=env, timeout=120)
        checks = {c["name"]: c for c in json.loads(doctor.stdout)}
        assert checks["server"]["result"] == "ok", checks["server"]
        assert "taken by another program" not in doctor.stdout
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        netlab.run("ip", "netns", "del", namespace, check=False)


def ssh_in(home: Path, container: str, command: str) -> subprocess.CompletedProcess[str]:
    """``p2prc ssh`` into a container, again while its sshd is still starting (255)."""
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run([P2PRC, "ssh", container, command], capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL,
                                env={**os.environ, "P2PRC_HOME": str(home)})
        if result.returncode != 255 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


@pytest.mark.docker
def test_a_container_shows_its_limits_and_has_the_tools_the_docs_use(
        tmp_path: Path, friend: LiveServer) -> None:
    me = tmp_path / "me"
    touched = p2prc(me, "touch", friend.peer(), "--cpus", "1", "--memory", "256M", "--json")
    assert touched.returncode == 0, touched.stderr
    container = json.loads(touched.stdout)["id"][:12]
    # What a user sees first: nproc (and OpenMP, BLAS, make -j$(nproc)) says the CPUs asked
    # for, not the host's; the limits are in the environment; a login says them.
    shown = ssh_in(me, container, "nproc; echo $P2PRC_CPUS $P2PRC_MEMORY $OMP_NUM_THREADS")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["1", "1", str(256 << 20), "1"], shown.stdout
    login = ssh_in(me, container, "bash -lic true")
    assert "may use 1 CPU(s) and 256 MiB of memory" in login.stdout + login.stderr, login
    tools = ssh_in(me, container, "command -v pip3 curl git rsync; echo $PATH")
    assert tools.returncode == 0 and len(tools.stdout.split()) == 5, tools
    assert tools.stdout.split()[-1].startswith("/root/.local/bin:"), tools.stdout
    # /usr is read-only: pip installs for root under /root/.local (a wheel made here: no
    # network is needed).
    wheel = ssh_in(me, container,
                   "mkdir -p /tmp/p && cd /tmp/p && printf 'from setuptools import setup\\n"
                   "setup(name=\"p2prchello\", version=\"1\", py_modules=[\"p2prchello\"])\\n'"
                   " > setup.py && echo 'X = 1' > p2prchello.py && pip3 install -q "
                   "--no-build-isolation --no-index . && cd / && python3 -c "
                   "'import p2prchello; print(p2prchello.__file__)'")
    assert wheel.returncode == 0 and "/root/.local/" in wheel.stdout, \
        wheel.stdout + wheel.stderr
