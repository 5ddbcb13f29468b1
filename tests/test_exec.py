"""``p2prc exec`` and ``p2prc jobs``: a command on a peer with its files, against the real
Docker engine (run under the flock: see docs/contributing), and peer choice without one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import wait_for

from conftest import P2PRC, LiveServer, friend_with, require
from p2prc_core.containers import ContainerStore
from p2prc_core.directory import PeerRow
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.exec_job import ExecSpec, Placement, command_script, missing_on, why_chosen
from p2prc_core.jobs import Job, JobStore


@pytest.fixture
def host(tmp_path: Path, engine: Any) -> Iterator[LiveServer]:
    require(subprocess.run(["which", "ssh"], capture_output=True).returncode == 0,
            "the ssh client is missing")
    with friend_with(tmp_path, engine, P2PRC_CONTAINERS_PER_CALLER="3") as server:
        yield server


def me(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, stdin=subprocess.DEVNULL,
                          env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})


def exec_started(tmp_path: Path, host: LiveServer, script: str, *options: str,
            session: bool = True, **env: str) -> subprocess.Popen[bytes]:
    """A real ``p2prc exec --on HOST [options] -- sh -c SCRIPT``, once the command printed
    its first line ('started'). ``session``: in a process group of its own, so a test can
    send Ctrl-C to the group as a terminal does."""
    proc = subprocess.Popen([P2PRC, "exec", "--on", host.peer(), *options, "--",
                             "sh", "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=session,
                            env={**os.environ, "P2PRC_HOME": str(tmp_path / "me"), **env})
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    return proc


def ours(engine: Any, host: LiveServer) -> list[str]:
    """The containers the host runs now (any caller's: here only ours)."""
    found = engine.api.containers(all=True, filters={"label": f"org.p2prc.node={host.node_id}"})
    return [c["Id"] for c in found]


def none_left(engine: Any, host: LiveServer, timeout: float = 30) -> list[str]:
    """The host's containers once none is left, or at ``timeout``: the host removes an
    exec's container once the caller has its exit (it does not hold the caller for the
    engine's removal), so the command may return a moment before."""
    deadline = time.monotonic() + timeout
    while (left := ours(engine, host)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def family(pid: int) -> list[int]:
    """``pid`` and every process under it (a server's workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found = [pid]
    while more := [c for c, p in parents.items() if p in found and c not in found]:
        found += more
    return found


def jobs(tmp_path: Path) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(me(tmp_path, "jobs", "ls", "--json").stdout)
    return listed


# -- on the real engine ------------------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.integration
def test_a_script_with_an_input_folder_and_an_output_comes_back(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("forty-two\n")
    (tmp_path / "work.sh").write_text("mkdir -p out && tr a-z A-Z < data/a.txt > out/result\n"
                                      "echo to-stdout $GREETING; echo to-stderr >&2\n")
    result = me(tmp_path, "exec", "--on", host.peer(), "-i", "data", "-i", "work.sh",
                "-o", "/job/out", "-e", "GREETING=hi there", "--", "sh", "work.sh")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "to-stdout hi there\n"  # stdout and stderr kept apart
    assert "to-stderr" in result.stderr and "to-stderr" not in result.stdout
    [job] = jobs(tmp_path)
    assert job["state"] == "done" and job["exit_code"] == 0
    assert (Path(job["out_dir"]) / "out" / "result").read_text() == "FORTY-TWO\n"
    assert Path(job["out_dir"]) == tmp_path / "p2prc-out" / job["id"]
    assert none_left(engine, host) == []  # the container is gone


@pytest.mark.docker
@pytest.mark.integration
def test_the_last_output_s_stream_has_the_host_remove_the_container(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    """With outputs, the container goes with the last one's stream: its host removes it once
    the archive is sent, as after a command with no outputs, and the caller does not wait
    for the engine's removal (half a second for a container that wrote 512 MiB)."""
    result = me(tmp_path, "exec", "--on", host.peer(), "-o", "a", "-o", "b", "--",
                "sh", "-c", "echo one > a; echo two > b")
    assert result.returncode == 0, result.stderr
    [job] = jobs(tmp_path)
    out_dir = Path(job["out_dir"])
    assert (out_dir / "a").read_text() == "one\n" and (out_dir / "b").read_text() == "two\n"
    assert none_left(engine, host) == []
    assert json.loads(me(tmp_path, "containers", "ls", "--json").stdout) == []  # forgotten
    short = job["container_id"][:12]
    wait_for(lambda: f"removed {short} after its exec" in host.output(), 10)
    assert f"DELETE /v1/containers/{job['container_id']}" not in host.output()


@pytest.mark.docker
@pytest.mark.integration
def test_a_failing_command_gives_its_exit_code_and_its_outputs(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    result = me(tmp_path, "exec", "--on", host.peer(), "-o", "out.txt", "--",
                "sh", "-c", "echo partial > out.txt; exit 7")
    assert result.returncode == 7, result.stderr
    [job] = jobs(tmp_path)
    assert job["state"] == "failed" and job["exit_code"] == 7
    assert (Path(job["out_dir"]) / "out.txt").read_text() == "partial\n"
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_ctrl_c_interrupts_the_command_fetches_outputs_and_removes_the_container(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    script = ("mkdir out; echo before > out/f; trap 'echo got-int > out/g; exit 130' INT; "
              "echo started; while true; do sleep 0.1; done")
    proc = exec_started(tmp_path, host, script, "-o", "out")
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to its whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    [job] = jobs(tmp_path)
    assert job["state"] == "interrupted"
    out = Path(job["out_dir"]) / "out"
    assert (out / "f").read_text() == "before\n" and (out / "g").read_text() == "got-int\n"
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_ctrl_c_while_the_inputs_upload_stops_and_removes_the_container(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as out:
        out.truncate(2 << 30)  # sparse: read as zeros, seconds to send
    proc = subprocess.Popen([P2PRC, "exec", "--on", host.peer(), "--memory", "3G", "-i",
                             str(big), "--", "sh", "-c", "echo ran"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    deadline = time.monotonic() + 60
    while not (ours(engine, host) and jobs(tmp_path)):  # the job has its container: the
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)  # upload starts at once
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"ran" not in out, (out, err)
    [job] = jobs(tmp_path)
    assert job["state"] == "failed" and job["exit_code"] is None, job  # the command never ran
    deadline = time.monotonic() + 30
    while ours(engine, host):  # removed, not left to its lease
        assert time.monotonic() < deadline, "the container was left behind"
        time.sleep(0.1)


@pytest.mark.docker
@pytest.mark.integration
def test_a_container_killed_by_its_host_during_the_upload_ends_the_exec(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    """The host's person kills the container while its inputs are sent: the exec says why
    the inputs did not get there and ends, within seconds (it waited forever before: the
    archive was packed into a pipe that nobody read any more)."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as out:
        out.truncate(2 << 30)
    proc = subprocess.Popen([P2PRC, "exec", "--on", host.peer(), "--memory", "3G", "-i",
                             str(big), "--", "sh", "-c", "echo ran"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    deadline = time.monotonic() + 60
    while not (ours(engine, host) and jobs(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    [container] = ours(engine, host)
    killed = subprocess.run([P2PRC, "server", "containers", "kill", container[:12]],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "P2PRC_HOME": str(host.home)})
    assert killed.returncode == 0, killed.stderr
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"ran" not in out, (out, err)
    said = err.decode()
    assert "the inputs could not be unpacked in the container: " in said, said
    assert "the container stopped" in said or "the container removed" in said, said
    assert "could not remove" not in said  # the host's removal, under way, is exec's too
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_a_second_ctrl_c_kills_a_command_that_ignores_the_first(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    proc = exec_started(tmp_path, host, "trap '' INT; echo started; sleep 60")
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while b"Ctrl-C again" not in (line := proc.stderr.readline() if proc.stderr else b""):
        assert line and time.monotonic() < deadline
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 137, err
    assert [j["state"] for j in jobs(tmp_path)] == ["interrupted"]
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_a_command_past_its_timeout_is_interrupted(tmp_path: Path, host: LiveServer) -> None:
    result = me(tmp_path, "exec", "--on", host.peer(), "--timeout", "1s", "--",
                "sleep", "30", timeout=25)
    assert result.returncode == 124, result.stderr  # timeout's own code


@pytest.mark.docker
@pytest.mark.integration
def test_plain_commands_end_with_130_on_ctrl_c(tmp_path: Path, host: LiveServer) -> None:
    proc = exec_started(tmp_path, host, "echo started; exec sleep 60", session=False)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # not 255: that would read as a lost connection


@pytest.mark.docker
@pytest.mark.integration
def test_detach_then_logs_follow_and_get(tmp_path: Path, host: LiveServer,
                                         engine: Any) -> None:
    script = "echo one; echo oops >&2; sleep 1; mkdir out; echo made > out/f; echo two; exit 3"
    started = me(tmp_path, "exec", "--detach", "--on", host.peer(), "-o", "out", "--",
                 "sh", "-c", script)
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    assert [j["state"] for j in jobs(tmp_path)] == ["detached"]
    logs = me(tmp_path, "jobs", "logs", "-f", job_id)
    assert logs.stdout == "one\ntwo\n" and "oops" in logs.stderr
    got = me(tmp_path, "jobs", "get", job_id)
    assert got.returncode == 0, got.stderr
    assert "exited 3" in got.stdout and "removed its container" in got.stdout
    [job] = jobs(tmp_path)
    assert job["state"] == "failed" and job["exit_code"] == 3
    assert (tmp_path / "p2prc-out" / job_id / "out" / "f").read_text() == "made\n"
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_on_a_group_runs_on_each_at_once_with_its_index(tmp_path: Path, host: LiveServer,
                                                        engine: Any) -> None:
    for _ in range(2):
        assert me(tmp_path, "touch", host.peer()).returncode == 0
    containers = json.loads(me(tmp_path, "containers", "ls", "--json").stdout)
    assert me(tmp_path, "group", "create", "pair").returncode == 0
    assert me(tmp_path, "group", "add", "pair",
              *[c["id"][:12] for c in containers]).returncode == 0
    result = me(tmp_path, "exec", "--on", "pair", "-o", "i", "--",
                "sh", "-c", 'echo $P2PRC_INDEX > i; echo "part $P2PRC_INDEX of $P2PRC_COUNT"')
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert len(lines) == 2 and {line.split("] ", 1)[1] for line in lines} == {
        "part 0 of 2", "part 1 of 2"}
    labels = {line[1:].split("] ", 1)[0] for line in lines}
    assert len(labels) == 2  # each line says which container it came from
    listed = jobs(tmp_path)
    batch = listed[0]["id"]
    indexes = {(tmp_path / "p2prc-out" / batch / label / "i").read_text() for label in labels}
    assert indexes == {"0\n", "1\n"}
    assert len(ours(engine, host)) == 2  # the user's own containers stay


@pytest.mark.docker
@pytest.mark.integration
def test_bad_inputs_are_refused_before_any_container_starts(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    result = me(tmp_path, "exec", "--on", host.peer(), "-i", "missing.csv", "--", "true")
    assert result.returncode == 1 and "missing.csv" in result.stderr
    (tmp_path / "big.bin").write_bytes(b"x" * 4096)
    result = subprocess.run([P2PRC, "exec", "--on", host.peer(), "-i", "big.bin", "--",
                             "true"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "P2PRC_HOME": str(tmp_path / "me"),
                                 "P2PRC_EXEC_MAX_INPUT": "1k"}, timeout=60)
    assert result.returncode == 1 and "exec_max_input" in result.stderr
    result = me(tmp_path, "exec", "--on", host.peer(), "-e", "1BAD=x", "--", "true")
    assert result.returncode == 1 and "1BAD" in result.stderr
    assert none_left(engine, host) == [] and jobs(tmp_path) == []


@pytest.mark.docker
@pytest.mark.integration
def test_a_hostile_output_archive_is_refused_with_a_clear_error(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    result = me(tmp_path, "exec", "--on", host.peer(), "-o", "/job/out", "--",
                "sh", "-c", "ln -s / /job/out")
    assert result.returncode == 1
    assert "/job/out" in result.stderr and "refused" in result.stderr.lower(), result.stderr
    [job] = jobs(tmp_path)
    out_dir = Path(job["out_dir"])
    assert not (out_dir / "out").exists() or not (out_dir / "out").is_symlink()
    assert list(outside.iterdir()) == []
    assert none_left(engine, host) == []


# -- without an engine -------------------------------------------------------------------------

def row(name: str, **fields: Any) -> PeerRow:
    values: dict[str, Any] = dict(
        name=name, node_id=name * 4, own_name=name, address="192.0.2.1:8088", path="direct",
        relays=(), latency_ms=12.0, bandwidth_mbps=None, last_seen=None, failures=0,
        gpus=(), gpus_free=0, memory=8 << 30, cpus=8, trusted=None, score=1.0,
        can_host=True, can_host_at=None)
    return PeerRow(**{**values, **fields})


class FakePeers:
    """What ``Executor.choose`` asks of ``ContainersOnPeers``: rows, and touch."""

    def __init__(self, rows: list[PeerRow], refusing: set[str]):
        self.peers = self
        self.rows_ = rows
        self.refusing = refusing
        self.touched: list[str] = []
        self.removed: list[str] = []
        self.settings = type("S", (), {"exec_max_input": 1 << 30})()

    def rows(self) -> list[PeerRow]:
        return self.rows_

    def touch(self, peer: str, **_: Any) -> str:
        self.touched.append(peer)
        if peer in self.refusing:
            raise PeerRefused("all its GPUs are taken", 409)
        return f"container-on-{peer}"

    def remove(self, container: str) -> None:
        self.removed.append(container)


def test_the_best_peer_that_fits_is_chosen_and_a_refusal_falls_to_the_next(
        tmp_path: Path) -> None:
    rows = [row("nogpu"), row("alice", gpus_free=2), row("bob", gpus_free=1)]
    fake = FakePeers(rows, refusing={"alice" * 4})
    said: list[str] = []
    executor = Placement(fake, said.append)  # type: ignore[arg-type]
    placed = executor.choose(ExecSpec(command=["true"], gpu=True), 1)
    assert placed == [("container-on-" + "bob" * 4, True)]
    assert fake.touched == ["alice" * 4, "bob" * 4]  # nogpu was never asked
    assert "alice did not start one" in said[0] and "trying the next" in said[0]
    assert said[1] == "on bob: will host you, 1 free GPU, 12 ms"


class SlowPeers(FakePeers):
    """A host that takes its time to start a container, and the user's Ctrl-C (``presses``
    of them, real SIGINTs) meanwhile."""

    def __init__(self, rows: list[PeerRow], refusing: set[str], presses: int):
        super().__init__(rows, refusing)
        self.presses = presses

    def touch(self, peer: str, **kwargs: Any) -> str:
        for _ in range(self.presses):
            os.kill(os.getpid(), signal.SIGINT)
        return super().touch(peer, **kwargs)


def test_a_ctrl_c_while_a_container_starts_waits_for_it_and_removes_it(
        capfd: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)
    fake = SlowPeers([row("alice")], set(), presses=1)
    with pytest.raises(KeyboardInterrupt):
        Placement(fake, lambda line: None).touch(  # type: ignore[arg-type]
            "alice", ExecSpec(command=["true"], on="alice"))
    assert fake.touched == ["alice"] and fake.removed == ["container-on-alice"]
    assert "removed once its host answers" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    # A second Ctrl-C gives up at once: nothing is known to remove (its host reaps it).
    fake = SlowPeers([row("alice")], set(), presses=2)
    with pytest.raises(KeyboardInterrupt):
        Placement(fake, lambda line: None).touch(  # type: ignore[arg-type]
            "alice", ExecSpec(command=["true"], on="alice"))
    assert fake.removed == [] and signal.getsignal(signal.SIGINT) is before
    # A removal that fails after the Ctrl-C: said, and still no next peer.
    fake = SlowPeers([row("alice"), row("bob")], set(), presses=1)
    started = type("Started", (), {"short_id": "c0ffee123456"})()

    def unreachable(container: Any) -> None:
        assert container is started
        raise PeerError("alice: no answer within 10 s")

    def starts(peer: str, **_: Any) -> Any:
        fake.touched.append(peer)
        os.kill(os.getpid(), signal.SIGINT)
        return started

    fake.touch = starts  # type: ignore[assignment]
    fake.remove = unreachable  # type: ignore[assignment]
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Placement(fake, said.append).choose(ExecSpec(command=["true"]), 1)  # type: ignore[arg-type]
    assert fake.touched == ["alice" * 4] and "could not remove" in said[-1]
    # A refusal after a Ctrl-C does not go on to the next peer.
    fake = SlowPeers([row("alice"), row("bob")], refusing={"alice" * 4}, presses=1)
    with pytest.raises(KeyboardInterrupt):
        Placement(fake, lambda line: None).choose(  # type: ignore[arg-type]
            ExecSpec(command=["true"]), 1)
    assert fake.touched == ["alice" * 4] and fake.removed == []


def test_when_no_peer_fits_the_error_names_what_each_lacked(tmp_path: Path) -> None:
    fake = FakePeers([row("small", memory=1 << 30), row("no", can_host=False)],
                     refusing={"no" * 4})
    executor = Placement(fake, lambda line: None)  # type: ignore[arg-type]
    with pytest.raises(P2PRCError, match=r"small has 1 GiB of memory \(4 GiB asked\); "
                                         r"no refused; 2 peers known"):
        executor.choose(ExecSpec(command=["true"], memory=4 << 30), 1)
    assert fake.touched == ["no" * 4]  # it said no before, and is asked all the same, last
    fake = FakePeers([row("a"), row("b", can_host=None)], refusing={"b" * 4})
    executor = Placement(fake, lambda line: None)  # type: ignore[arg-type]
    with pytest.raises(P2PRCError, match=r"\(2 asked\).*b refused"):
        executor.choose(ExecSpec(command=["true"]), 2)
    assert fake.removed == ["container-on-" + "a" * 4]  # the one it did start is given back


def test_why_chosen_is_one_line() -> None:
    assert why_chosen(row("alice", gpus_free=2)) == "on alice: will host you, 2 free GPUs, 12 ms"
    assert missing_on(row("x", cpus=2), ExecSpec(command=["t"], cpus=4)) == "has 2 CPUs (4 asked)"


def test_the_command_is_quoted_never_templated() -> None:
    script = command_script(["sh", "-c", "echo $HOME; rm -rf /'"], {"A": "x y; reboot"},
                            "/job dir", 60, "0123abcd")
    assert script.startswith("mkdir -p '/job dir' && cd '/job dir' && exec sh -c ")
    import shlex
    inner = shlex.split(script)[-1]  # what the remote sh -c runs
    words = shlex.split(inner.split("; trap : INT; ", 1)[1])
    assert words == ["timeout", "--foreground", "--signal=INT", "--kill-after=10s", "60s",
                     "env", "--", "A=x y; reboot", "sh", "-c", "echo $HOME; rm -rf /'"]


@pytest.mark.docker
@pytest.mark.integration
def test_a_command_that_exits_255_is_not_a_lost_connection(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    result = me(tmp_path, "exec", "--on", host.peer(), "--", "sh", "-c", "exit 255")
    assert result.returncode == 255, result.stderr
    assert "lost the connection" not in result.stderr
    [job] = jobs(tmp_path)
    assert job["state"] == "failed" and job["exit_code"] == 255  # ended, as exit 7 does
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_a_quick_second_ctrl_c_still_cleans_up(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    proc = exec_started(tmp_path, host, "trap '' INT; mkdir out; echo started; sleep 60",
                        "-o", "out")
    os.killpg(proc.pid, signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):  # a person's quick second press, while
        proc.wait(timeout=0.05)  # the first is passed on (two at once are one signal)
    os.killpg(proc.pid, signal.SIGINT)  # no wait for the message
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 137, err
    assert [j["state"] for j in jobs(tmp_path)] == ["interrupted"]
    assert none_left(engine, host) == []


def test_a_damaged_job_record_is_not_listed(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = Job(id=store.new_id(), peer_id="n", peer_name="alice", container_id="c",
              command=["true"], started=time.time())
    store.save(job)
    (tmp_path / "jobs" / "deadbeef").mkdir()
    (tmp_path / "jobs" / "deadbeef" / "job.json").write_text('{"id": "../x", "state": "x"}')
    (tmp_path / "jobs" / "0badf00d").mkdir()
    (tmp_path / "jobs" / "0badf00d" / "job.json").write_text("not json")
    assert [j.id for j in store.all()] == [job.id]
    assert store.get(job.id[:3]).id == job.id
    with pytest.raises(P2PRCError, match="no job"):
        store.get("zz")


def test_records_of_the_wrong_types_never_break_jobs_ls(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "me")
    job = Job(id=store.new_id(), peer_id="n", peer_name="alice", container_id="c",
              command=["true"], outputs=[{"remote": "/job/o", "local": "/tmp/o"}])
    store.save(job)
    good = job.as_dict()
    damaged: list[tuple[str, dict[str, Any]]] = [
        ("a0000001", {"started": "x"}), ("a0000002", {"command": [1]}),
        ("a0000003", {"outputs": 5}), ("a0000004", {"outputs": [{"remote": 1}]}),
        ("a0000005", {"exit_code": "0"}), ("a0000006", {"keep": "yes"}),
        ("a0000007", {})]  # the last: its folder is not named by its id
    for name, bad in damaged:
        (store.root / name).mkdir()
        record = {**good, "id": name if bad else job.id, **bad}
        (store.root / name / "job.json").write_text(json.dumps(record))
    assert [j.id for j in store.all()] == [job.id]
    assert len(store.damaged) == 7
    listed = me(tmp_path, "jobs", "ls")
    assert listed.returncode == 0, listed.stderr
    assert job.id in listed.stdout and listed.stderr.count("skipped 7 damaged") == 1
    assert json.loads(me(tmp_path, "jobs", "ls", "--json").stdout)[0]["id"] == job.id
    assert me(tmp_path, "jobs", "show", job.id).returncode == 0


def test_a_third_ctrl_c_stops_the_fetch_but_not_the_cleanup(tmp_path: Path) -> None:
    from p2prc_core.archive import Output
    from p2prc_core.exec_job import CtrlC, Executor, JobRun

    class Shell:
        closed = False
        host_removed = False

        def fetch(self, output: Output, max_bytes: int, remove: bool = False) -> list[Path]:
            for _ in range(1000):  # Ctrl-C pressed again and again while outputs come back
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
            raise AssertionError("the fetch was never stopped")

        def close(self) -> None:
            self.closed = True

    fake = FakePeers([], set())
    fake.settings = type("S", (), {"request_timeout": 5, "exec_max_output": 1 << 20})()
    store = JobStore(tmp_path)
    job = Job(id=store.new_id(), peer_id="n", peer_name="alice", container_id="c",
              command=["true"])
    shell = Shell()
    run = JobRun(job, "the-container", shell, [Output("/job/o", tmp_path / "o")],  # type: ignore[arg-type]
                 "alice", True, proc=type("P", (), {"returncode": 0})())  # type: ignore[arg-type]
    executor = Executor(fake, store, lambda line: None)  # type: ignore[arg-type]
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as executor.ctrl_c:
        executor.finish(run, fetch=True)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    assert shell.closed and fake.removed == ["the-container"]
    assert store.get(job.id).state == "interrupted"


def test_job_files_are_per_job_and_workdir_must_be_absolute(tmp_path: Path) -> None:
    one = command_script(["true"], {}, "/job", 60, "0000aaaa")
    two = command_script(["true"], {}, "/job", 60, "0000bbbb")
    assert "/run/p2prc-job-0000aaaa.pid" in one and "/run/p2prc-job-0000aaaa.exit" in one
    assert "0000aaaa" not in two
    from p2prc_core.exec_job import check_spec, detached_script, logs_script
    assert "/run/p2prc-job-0000aaaa.out" in detached_script(["true"], {}, "/job", 60,
                                                            "0000aaaa")
    assert "/run/p2prc-job-0000aaaa.err" in logs_script(True, "0000aaaa")
    for workdir in ("job", "/job/../etc", ""):
        with pytest.raises(P2PRCError):
            check_spec(ExecSpec(command=["true"], workdir=workdir), 1 << 30)


@pytest.mark.docker
@pytest.mark.integration
def test_node_exec_captures_the_output_and_brings_the_outputs_back(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    from p2prc.api import Node

    (tmp_path / "in.txt").write_text("abc")
    node = Node.open(tmp_path / "me")
    result = node.exec(["sh", "-c", "rev in.txt > out.txt; echo said; echo warned >&2; exit 4"],
                       inputs=[str(tmp_path / "in.txt")], outputs=["out.txt", "none.txt"],
                       on=host.peer(), out_root=tmp_path / "got")
    assert (result.exit_code, result.stdout, result.stderr) == (4, "said\n", "warned\n")
    assert [p.read_text() for p in result.output_paths] == ["cba"]
    assert any("none.txt" in note for note in result.notes)  # what exec would have said
    assert result.output_paths[0] == tmp_path / "got" / result.job_id / "out.txt"
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_execs_one_after_another_are_not_refused_for_the_one_before(
        tmp_path: Path, engine: Any) -> None:
    """A host that lets each caller hold one container, and four execs in a row from one
    process, each starting as soon as the one before returned: none is refused with a 429
    for the container before, which the host removes after its caller has the exit (the
    caller's place is given back before it hears the end). That container is gone soon
    after, and nothing is left held."""
    from p2prc.api import Node

    with friend_with(tmp_path, engine, P2PRC_CONTAINERS_PER_CALLER="1") as host:
        node = Node.open(tmp_path / "me")
        for i in range(4):
            result = node.exec(["sh", "-c", f"echo {i}"], on=host.peer())
            assert (result.exit_code, result.stdout) == (0, f"{i}\n")
        assert none_left(engine, host) == []
        store = ContainerStore(host.home, (1, 65535))
        wait_for(lambda: not store.leases() and not store.held_ports(),
                 what="the host holds no lease or port")


@pytest.mark.docker
@pytest.mark.integration
def test_a_host_that_stops_answering_leaves_a_lost_job_to_get_later(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    script = ("mkdir out; echo kept > out/f; echo started; "
              "while [ ! -e go ]; do sleep 0.1; done; exit 6")
    proc = exec_started(tmp_path, host, script, "-o", "out", session=False,
                        P2PRC_REQUEST_TIMEOUT="2")
    hung = family(host.proc.pid)
    for pid in hung:  # the host hangs, workers and all: its tunnel carries nothing
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 8  # within about request_timeout (keepalives)
        [job] = jobs(tmp_path)
        unreachable = me(tmp_path, "jobs", "get", job["id"], timeout=60)
        assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr, \
            unreachable.stderr
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 255
    assert b"lost the connection to" in err and b"p2prc jobs get" in err
    [job] = jobs(tmp_path)
    assert job["state"] == "lost" and len(ours(engine, host)) == 1  # kept, to get later
    early = me(tmp_path, "jobs", "get", job["id"])  # it still runs there: not removed
    assert early.returncode == 1 and "still runs" in early.stderr, early.stderr
    assert "jobs rm" in early.stderr and len(ours(engine, host)) == 1
    [container] = ours(engine, host)
    touch = engine.api.exec_create(container, ["touch", "/job/go"])
    engine.api.exec_start(touch["Id"])
    deadline = time.monotonic() + 30
    while (got := me(tmp_path, "jobs", "get", job["id"])).returncode != 0:
        assert "still runs" in got.stderr and time.monotonic() < deadline, got.stderr
    assert "exited 6" in got.stdout  # its exit code, kept in the container for us
    [job] = jobs(tmp_path)
    assert job["state"] == "failed" and job["exit_code"] == 6
    assert (Path(job["out_dir"]) / "out" / "f").read_text() == "kept\n"
    assert none_left(engine, host) == []


@pytest.mark.docker
@pytest.mark.integration
def test_with_a_terminal_it_runs_with_a_tty(tmp_path: Path, host: LiveServer) -> None:
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: p2prc exec on the terminal
        os.chdir(tmp_path)
        os.environ["P2PRC_HOME"] = str(tmp_path / "me")
        os.execv(P2PRC, [P2PRC, "exec", "--on", host.peer(), "--", "sh", "-c",
                         "test -t 0 && echo has-a-tty; read line; echo got $line; exit 5"])
    deadline = time.monotonic() + 60

    def read_until(word: bytes) -> bytes:
        found = b""
        while word not in found and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                found += os.read(fd, 1024)
        return found

    seen = read_until(b"has-a-tty")
    os.write(fd, b"typed\n")
    seen += read_until(b"got typed")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"got typed" in seen, seen
    assert os.waitstatus_to_exitcode(status) == 5
