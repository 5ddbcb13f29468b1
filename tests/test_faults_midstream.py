"""Faults mid-stream, with real servers, the real engine and the real command line: a host's
server killed (``kill -9``, master and worker) while ``p2prc exec`` and ``p2prc run`` work
on it, and a relay killed while an exec crosses it. The client says what happened within
``request_timeout`` and exits non-zero; nothing hangs; the host runs nothing that nobody
knows of, and what the host cannot end at once (a command whose caller it lost) is gone
after its lease. Each case prints the seconds from the kill to the client's exit, and what
the client said. (Run under the flock: see docs/contributing.)"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_exec import family

from conftest import P2PRC, LiveServer, free_port, require, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

REQUEST_TIMEOUT = 4.0  # the clients' request_timeout here: short, so a hang shows
LEASE = 20  # seconds: a container's short lease, to see the reaper take it


class Node:
    """One node's home and its ``p2prc`` command line."""

    def __init__(self, home: Path, **env: str):
        self.home = home
        self.env = {**os.environ, "P2PRC_HOME": str(home),
                    "P2PRC_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT), **env}

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.home.parent, stdin=subprocess.DEVNULL, env=self.env)

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([P2PRC, *args], cwd=self.home.parent, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)

    def touch(self, peer: str, *options: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.json("touch", peer, *options)
        return reply

    def leftovers(self) -> list[str]:
        """Processes still running with this home (ssh masters, tunnel helpers)."""
        mark = f"P2PRC_HOME={self.home}".encode() + b"\0"
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark in environ.read_bytes() and environ.parent.name != str(os.getpid()):
                    found.append((environ.parent / "cmdline").read_bytes()
                                 .replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue  # it ended meanwhile
        return found


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.1)
    return result


def first_line(proc: subprocess.Popen[bytes], timeout: float = 90) -> bytes:
    """The client's first line of output (the command's marker), never waiting forever."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no output within {timeout:g} s: {proc.communicate()}")
    return proc.stdout.readline()


def kill_server(server: LiveServer) -> float:
    """``kill -9`` the whole server, the gunicorn master and its workers; when it was."""
    pids = family(server.proc.pid)
    assert len(pids) >= 2, "no worker under the server's master"
    killed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    return killed


def ended(proc: subprocess.Popen[bytes], killed: float, case: str) -> tuple[int, str, float]:
    """The client's exit code, what it said on stderr, and the seconds since the kill; it
    must end within request_timeout (and is killed, and the test fails, when it hangs)."""
    try:
        out, err = proc.communicate(timeout=REQUEST_TIMEOUT * 3)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{case}: the client hangs: {proc.communicate()}") from None
    seconds = time.monotonic() - killed
    said = err.decode(errors="replace").strip()
    print(f"\n[{case}] exit {proc.returncode} {seconds:.2f} s after the kill: {said!r}")
    assert seconds < REQUEST_TIMEOUT, f"{case}: {seconds:.1f} s to end: {said}"
    assert "Traceback" not in said, said
    return proc.returncode, said, seconds


def labelled(engine: Any, node_id: str) -> set[str]:
    """Every container on the engine with the node's label: all it ever started."""
    found = engine.api.containers(all=True, filters={"label": f"org.p2prc.node={node_id}"})
    return {c["Id"] for c in found}


def in_container(engine: Any, container_id: str, command: str) -> int:
    run = engine.api.exec_create(container_id, ["sh", "-c", command])
    engine.api.exec_start(run["Id"])
    code: int = engine.api.exec_inspect(run["Id"])["ExitCode"]
    return code


class Hosts:
    """The servers a test starts, and the containers they started: all gone after."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.servers: list[LiveServer] = []
        self.nodes: set[str] = set()

    def start(self, home: Path, port: int | None = None, **env: str) -> LiveServer:
        server = start_server(home, env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                         "P2PRC_REAP_SECONDS": "1", **env}, port=port)
        self.servers.append(server)
        self.nodes.add(server.node_id)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for node_id in self.nodes:
            for container_id in labelled(self.engine, node_id):
                self.engine.api.remove_container(container_id, force=True)


@pytest.fixture
def hosts(engine: Any) -> Iterator[Hosts]:
    started = Hosts(engine)
    try:
        yield started
    finally:
        started.close()


def friend(tmp_path: Path, hosts: Hosts, me: Node, **env: str) -> LiveServer:
    """A host named alice that trusts ``me``."""
    TrustStore(tmp_path / "host").add(NodeIdentity.load_or_create(me.home).node_id, "me")
    return hosts.start(tmp_path / "host", P2PRC_NAME="alice", **env)


def listed_on_host(host: LiveServer) -> set[str]:
    done = subprocess.run([P2PRC, "server", "containers", "ls", "--json"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "P2PRC_HOME": str(host.home)})
    assert done.returncode == 0, done.stderr
    return {c["id"] for c in json.loads(done.stdout)}


# -- a host killed mid-exec ----------------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.integration
def test_a_host_killed_mid_exec_is_said_at_once_and_leaves_nothing_unknown(
        tmp_path: Path, engine: Any, hosts: Hosts) -> None:
    me = Node(tmp_path / "me")
    host = friend(tmp_path, hosts, me)
    own = me.touch(host.peer(), "--ttl", f"{LEASE}s")  # the user's own, with a short lease
    # Two jobs: one in a fresh container (its lease: --timeout plus 10 minutes), one in the
    # user's own container; both print a line, then wait.
    fresh_job = me.start("exec", "--on", host.peer(), "--", "sh", "-c",
                         "echo started; while [ ! -e go ]; do sleep 0.1; done; exit 6")
    own_job = me.start("exec", "--on", own["id"][:12], "--", "sh", "-c",
                       "echo started; exec sleep 300")
    assert first_line(fresh_job) == b"started\n" and first_line(own_job) == b"started\n"
    killed = kill_server(host)
    for proc, case in ((fresh_job, "host killed mid-exec"),
                       (own_job, "host killed mid-exec, the user's own container")):
        code, said, _ = ended(proc, killed, case)
        assert code == 255, said  # no exit code came: the connection's, not the command's
        assert "lost the connection to" in said and "p2prc jobs get" in said, said
    jobs = me.json("jobs", "ls")
    fresh = next(j for j in jobs if "[ ! -e go ]" in j["command"][-1])
    mine = next(j for j in jobs if "sleep 300" in j["command"][-1])
    assert fresh["state"] == mine["state"] == "lost", jobs
    on_engine = labelled(engine, host.node_id)
    assert on_engine == {fresh["container_id"], own["id"]}  # nothing else was started

    host = hosts.start(host.home, port=host.port, P2PRC_NAME="alice")  # the same home
    if time.time() < own["expires"] - 1:  # (a very slow machine: past its lease already)
        # Every container the engine runs for this node is one the host lists, and one the
        # client knows it holds: nothing runs that nobody knows of.
        assert listed_on_host(host) == on_engine
        states = {c["id"]: c["state"] for c in me.json("containers", "ls")}
        assert states == {c: "running" for c in on_engine}, states
    # The fresh job is got once its command ended, which removes its container.
    early = me("jobs", "get", fresh["id"])
    assert early.returncode == 1 and "still runs" in early.stderr, early.stderr
    assert in_container(engine, fresh["container_id"], "touch /job/go") == 0
    got = wait_until(lambda: (done := me("jobs", "get", fresh["id"])).returncode == 0 and done,
                     30, "the lost job's exit code came back")
    assert "exited 6" in got.stdout
    assert fresh["container_id"] not in labelled(engine, host.node_id)
    # The user's own container goes when its lease ends (the reaper, every second), not
    # before, with whatever the lost job left running in it.
    wait_until(lambda: own["id"] not in labelled(engine, host.node_id), LEASE + 15,
               "the container was reaped at the end of its lease")
    assert time.time() >= own["expires"] - 1, "removed before its lease ended"
    assert listed_on_host(host) == set() and labelled(engine, host.node_id) == set()
    [kept] = me.json("containers", "ls")  # the client still holds it, and says it is over
    assert kept["id"] == own["id"] and kept["state"] == "expired", kept
    assert me.leftovers() == []


# -- a host killed mid-run -----------------------------------------------------------------------

LONG_TASK = """- hosts: all
  gather_facts: false
  tasks:
    - name: a long task
      ansible.builtin.shell: sleep 300
"""


@pytest.mark.docker
@pytest.mark.ansible
@pytest.mark.integration
def test_a_host_killed_mid_run_is_said_at_once_and_its_task_ends(
        tmp_path: Path, engine: Any, hosts: Hosts) -> None:
    require(shutil.which("ansible-playbook") is not None or
            Path(P2PRC).with_name("ansible-playbook").exists(), "ansible-playbook is missing")
    me = Node(tmp_path / "me")
    host = friend(tmp_path, hosts, me)
    container = me.touch(host.peer())["id"]
    (tmp_path / "site.yml").write_text(LONG_TASK)
    run = me.start("run", "./site.yml", "--on", container[:12])
    wait_until(lambda: in_container(engine, container, "pgrep -x sleep") == 0
               or run.poll() is not None, 120, "the task's command runs")
    assert run.poll() is None, run.communicate()
    killed = kill_server(host)
    code, said, _ = ended(run, killed, "host killed mid-run")
    assert code == 1
    record = me.json("runs", "show", "last")
    result = record["hosts"][container[:12]]
    print(f"[host killed mid-run] {result['status']}: {result['message']}")
    assert result["status"] == "unreachable" and result["task"] == "a long task", result
    assert "ssh" in result["message"].lower(), result  # what broke: the connection
    # The task's command was on a TTY that the lost connection hung up: it is gone at once.
    wait_until(lambda: in_container(engine, container, "pgrep -x sleep") == 1,
               REQUEST_TIMEOUT, "the task's command ended with its session")
    wait_until(lambda: me.leftovers() == [], REQUEST_TIMEOUT,
               "no ssh master or tunnel of the client's is left")


# -- a relay killed mid-stream -------------------------------------------------------------------

def through_relay(tmp_path: Path, hosts: Hosts, me: Node) -> tuple[LiveServer, LiveServer]:
    """A relay, and alice, reached through it only (a direct dial finds nothing there), and
    ``me`` knowing her by the relay."""
    relay = hosts.start(tmp_path / "relay", P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true")
    host = friend(tmp_path, hosts, me, P2PRC_USE_RELAY="always",
                  P2PRC_ADVERTISE_ADDRESSES="127.0.0.1", P2PRC_ADVERTISE_PORT=str(free_port()),
                  P2PRC_RELAYS=f"{relay.node_id}@127.0.0.1:{relay.port}")
    wait_until(lambda: any((relay.home / "relay").glob(f"w.{host.node_id}.*")), 30,
               "alice waits at the relay")
    added = me("peers", "add", relay.peer())
    assert added.returncode == 0, added.stderr

    def knows_the_relay() -> bool:
        me("peers", "update", "--hops", "2")
        rows = {r["node_id"]: r for r in me.json("peers", "ls")}
        return host.node_id in rows and bool(rows[host.node_id]["relays"])
    wait_until(knows_the_relay, 30, "we learnt alice's relay")
    return relay, host


@pytest.mark.docker
@pytest.mark.integration
def test_a_relay_killed_mid_exec_is_said_at_once_and_the_host_lets_go(
        tmp_path: Path, engine: Any, hosts: Hosts) -> None:
    # Punching off: every byte of the stream crosses the relay.
    me = Node(tmp_path / "me", P2PRC_ALLOW_LOOPBACK="true", P2PRC_PUNCH="false")
    relay, host = through_relay(tmp_path, hosts, me)
    own = me.touch(host.node_id, "--ttl", f"{LEASE}s")
    job = me.start("exec", "--on", own["id"][:12], "--", "sh", "-c",
                   "echo started; while sleep 0.2; do echo tick; done")
    assert first_line(job) == b"started\n"
    killed = kill_server(relay)
    code, said, _ = ended(job, killed, "relay killed mid-exec")
    assert code == 255, said
    assert "lost the connection to alice (through relay" in said, said
    [lost] = me.json("jobs", "ls")
    assert lost["state"] == "lost" and "through relay" in lost["message"], lost
    # The host learns at once that its caller is gone, and lets the stream go; the command
    # runs on (a lost job is got later), until its container's lease ends.
    wait_until(lambda: "the caller left before the command ended" in host.output(),
               REQUEST_TIMEOUT, "alice let go of the stream")
    wait_until(lambda: own["id"] not in labelled(engine, host.node_id), LEASE + 15,
               "the container was reaped at the end of its lease")
    assert time.time() >= own["expires"] - 1, "removed before its lease ended"
    assert labelled(engine, host.node_id) == set()
    assert me.leftovers() == []
