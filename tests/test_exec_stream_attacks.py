"""Attacks on exec streams (``POST /v1/containers/{id}/exec``), both ways: a caller hostile to
the host (others' containers, held threads, floods, a caller that never reads) on a real
server and the real engine (run under the flock: see docs/contributing); a host hostile to
the caller (odd frames, escapes, endless output, silence) as a scripted peer on loopback."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import socket
import sqlite3
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_exec_stream import raw_stream, running, start_frame, target, touched

from conftest import P2PRC, LiveServer, friend_with, web
from p2prc_core import exec_frames as fr
from p2prc_core.archive import Output
from p2prc_core.errors import P2PRCError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import STREAM_PROTOCOL, Endpoint
from p2prc_core.stream_shell import LOST, NoExecRoute, StreamProc, StreamShell, Target
from p2prc_core.tunnel_streams import open_stream

TICK = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def host(tmp_path: Path, engine: Any) -> Iterator[LiveServer]:
    with friend_with(tmp_path, engine, P2PRC_CONTAINERS_PER_CALLER="3") as server:
        yield server


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        each = todo.pop()
        found.append(each)
        try:
            for task in os.listdir(f"/proc/{each}/task"):
                with open(f"/proc/{each}/task/{task}/children") as kids:
                    todo += [int(k) for k in kids.read().split()]
        except OSError:
            pass
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) the server's processes have used."""
    total = 0
    for each in tree(pid):
        try:
            with open(f"/proc/{each}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def rss_bytes(pid: int) -> int:
    total = 0
    for each in tree(pid):
        try:
            with open(f"/proc/{each}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_fds(host: LiveServer) -> int:
    return sum(fd_count(each) for each in tree(host.proc.pid))


def healthy(host: LiveServer) -> bool:
    return bool(web.get(host.url() + "/v1/health", timeout=5).status_code == 200)


def wait_until(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while not (got := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


async def opened(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer, first, _ = await open_stream(
        t.endpoints, t.identity, f"/v1/containers/{t.container_id}/exec", "", t.timeout)
    return reader, writer, first


# -- a caller reaching what is not its own -----------------------------------------------------

@pytest.mark.docker
@pytest.mark.integration
def test_another_caller_can_neither_run_in_nor_remove_a_container_by_id_or_prefix(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    from p2prc_core.trust import TrustStore

    container_id = touched(tmp_path, host)
    other = NodeIdentity.load_or_create(tmp_path / "other")
    TrustStore(host.home).add(other.node_id, "other")
    for given in (container_id, container_id[:12]):
        with pytest.raises(NoExecRoute, match="404"):
            StreamProc(target(tmp_path, host, given, home="other"), ["true"], remove=True)
    assert running(engine, container_id)
    # Its owner reaches it by a 12-character prefix; shorter is refused as malformed.
    proc = StreamProc(target(tmp_path, host, container_id[:12]), ["true"], None, piped=True)
    assert proc.wait(30) == 0
    with pytest.raises(PeerRefused, match="400"):
        StreamProc(target(tmp_path, host, container_id[:11]), ["true"])


@pytest.mark.docker
@pytest.mark.integration
def test_a_pooled_container_is_no_callers_to_run_in(tmp_path: Path, engine: Any) -> None:
    with friend_with(tmp_path, engine, P2PRC_CONTAINER_WARM_POOL="1") as server:
        def pooled() -> list[str]:
            return [c.id for c in engine.containers.list(
                filters={"label": f"org.p2prc.node={server.node_id}"})]
        [pool_id] = wait_until(pooled, 90, "no pooled container came")
        for given in (pool_id, pool_id[:12]):
            with pytest.raises(NoExecRoute, match="404"):
                StreamProc(target(tmp_path, server, given), ["true"], remove=True)
        assert running(engine, pool_id)


@pytest.mark.docker
@pytest.mark.integration
def test_a_removed_container_is_unknown_and_one_gone_from_the_engine_is_a_clean_error(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    first, second = touched(tmp_path, host), touched(tmp_path, host)
    engine.containers.get(first).remove(force=True)  # gone behind p2prc's back
    got = raw_stream(target(tmp_path, host, first), start_frame(["true"]))
    assert [kind for kind, _ in got] == [fr.ERROR]
    assert b"not running" in got[0][1] or b"gone" in got[0][1], got
    assert b"\x1b" not in got[0][1]
    removed = subprocess.run([P2PRC, "rm", second], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(NoExecRoute, match="404"):
        StreamProc(target(tmp_path, host, second), ["true"])


@pytest.mark.docker
@pytest.mark.integration
def test_a_container_whose_lease_ran_out_runs_nothing(tmp_path: Path, engine: Any) -> None:
    with friend_with(tmp_path, engine, P2PRC_REAP_SECONDS="3600") as server:
        container_id = touched(tmp_path, server)
        with sqlite3.connect(server.home / "server.db") as db:
            past = time.time() - 5
            db.execute("UPDATE leases SET expires=?, data=json_set(data, '$.expires', ?) "
                       "WHERE id=?", (past, past, container_id))
        with pytest.raises(NoExecRoute, match="404"):
            StreamProc(target(tmp_path, server, container_id), ["true"])


# -- holding the host --------------------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.integration
def test_streams_that_never_start_hold_only_the_streams_budget_and_end_in_time(
        tmp_path: Path, engine: Any) -> None:
    with friend_with(tmp_path, engine, P2PRC_THREADS="4") as server:  # two for streams
        t = target(tmp_path, server, touched(tmp_path, server))

        async def go() -> tuple[list[bytes], float]:
            held = [await opened(t) for _ in range(2)]
            began = time.monotonic()
            with pytest.raises(PeerRefused, match="503"):  # the budget is kept
                await opened(t)
            assert await asyncio.to_thread(healthy, server)  # ordinary requests still answer
            said = []
            for reader, writer, first in held:
                said.append(first + await asyncio.wait_for(reader.read(), 20))
                writer.close()
            return said, time.monotonic() - began
        _, took = asyncio.run(go())
        assert took < 15  # START_WITHIN, and slack
        proc = wait_until(lambda: _started(t), 10, "the slots did not come back")
        assert proc.wait(30) == 0


@pytest.mark.docker
@pytest.mark.integration
def test_a_stream_that_never_starts_is_told_why_it_ends(tmp_path: Path, host: LiveServer) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))

    async def go() -> bytes:
        reader, writer, first = await opened(t)
        said = first + await asyncio.wait_for(reader.read(), 20)
        writer.close()
        return said
    assert fr.frame(fr.ERROR, b"no START frame within 10 s") == asyncio.run(go())


def _started(t: Target) -> StreamProc | None:
    try:
        return StreamProc(t, ["true"], None, piped=True)
    except PeerRefused:
        return None


@pytest.mark.docker
@pytest.mark.integration
def test_a_stdin_flood_to_a_command_that_does_not_read_costs_the_host_no_cpu(
        tmp_path: Path, host: LiveServer) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))

    async def go() -> float:
        reader, writer, _ = await opened(t)
        writer.write(start_frame(["sleep", "12"], stdin=True))
        chunk = fr.frame(fr.STDIN, b"x" * (256 << 10))

        async def flood() -> None:
            while True:
                writer.write(chunk)
                await writer.drain()
        flooding = asyncio.ensure_future(flood())
        await asyncio.sleep(3)  # the engine's and the host's buffers fill
        before = cpu_seconds(host.proc.pid)
        await asyncio.sleep(4)
        used = cpu_seconds(host.proc.pid) - before
        assert await asyncio.to_thread(healthy, host)
        flooding.cancel()
        writer.close()
        return used
    used = asyncio.run(go())
    assert used < 1.0, f"the host used {used:.1f} s of CPU in 4 s while the stream waited"


@pytest.mark.docker
@pytest.mark.integration
def test_a_caller_that_never_reads_costs_the_host_no_cpu_and_bounded_memory(
        tmp_path: Path, host: LiveServer) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))

    async def go() -> tuple[float, int]:
        _, writer, _ = await opened(t)
        rss = rss_bytes(host.proc.pid)
        writer.write(start_frame(["sh", "-c", "timeout 15 yes"]))
        await asyncio.sleep(3)  # both ends' buffers fill; the reader paused at its limit
        before = cpu_seconds(host.proc.pid)
        await asyncio.sleep(4)
        used = cpu_seconds(host.proc.pid) - before
        grew = rss_bytes(host.proc.pid) - rss
        assert await asyncio.to_thread(healthy, host)
        writer.close()
        return used, grew
    used, grew = asyncio.run(go())
    assert grew < 64 << 20, f"the host grew by {grew >> 20} MiB"
    assert used < 1.0, f"the host used {used:.1f} s of CPU in 4 s while the stream waited"


@pytest.mark.docker
@pytest.mark.integration
def test_the_host_keeps_its_memory_while_a_caller_never_reads(
        tmp_path: Path, host: LiveServer) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))

    async def go() -> int:
        _, writer, _ = await opened(t)
        rss = rss_bytes(host.proc.pid)
        writer.write(start_frame(["sh", "-c", "timeout 15 yes"]))
        await asyncio.sleep(5)
        grew = rss_bytes(host.proc.pid) - rss
        assert await asyncio.to_thread(healthy, host)
        writer.close()
        return grew
    grew = asyncio.run(go())
    assert grew < 64 << 20, f"the host grew by {grew >> 20} MiB"


@pytest.mark.docker
@pytest.mark.integration
def test_a_stdin_frame_of_the_largest_size_allowed_reaches_the_command(
        tmp_path: Path, host: LiveServer) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))
    payload = b"x" * fr.MAX_PAYLOAD
    whole = fr.frame(fr.STDIN, payload) + fr.frame(fr.STDIN_END)
    split = 1 << 20  # the first MiB now, the rest a moment later (as a slow network may)

    async def go() -> list[tuple[int, bytes]]:
        reader, writer, first = await opened(t)
        writer.write(start_frame(["wc", "-c"], stdin=True) + whole[:split])
        await writer.drain()
        await asyncio.sleep(1)
        writer.write(whole[split:])
        got: list[tuple[int, bytes]] = []
        buffered = bytearray(first)
        try:
            async with asyncio.timeout(15):
                while not any(kind in (fr.EXIT, fr.ERROR) for kind, _ in got):
                    data = await reader.read(1 << 16)
                    if not data:
                        break
                    buffered += data
                    got += fr.frames(buffered, frozenset(range(7)))
        except TimeoutError:
            pass
        writer.close()
        return got
    got = asyncio.run(go())
    out = b"".join(payload for kind, payload in got if kind == fr.STDOUT)
    assert (out.strip(), got[-1:]) == (str(len(payload)).encode(), [(fr.EXIT, b"0")])


@pytest.mark.docker
@pytest.mark.integration
def test_many_steps_leak_no_descriptors_on_either_side(
        tmp_path: Path, host: LiveServer) -> None:
    shell = StreamShell(target(tmp_path, host, touched(tmp_path, host)), "job1")
    assert shell.quick("true").returncode == 0  # the first opens what is kept (pools, loops)
    ours, theirs = fd_count(), server_fds(host)
    for each in range(200):
        done = shell.quick(f"echo {each}; echo e >&2")
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{each}\n".encode(), b"e\n")
    # A descriptor kept per step would be 200 more here. A few may wait for the collector
    # (a closed stream's objects), or belong to an earlier test's threads ending meanwhile.
    gc.collect()
    wait_until(lambda: fd_count() - ours < 5, 10, "this process kept descriptors")
    # A descriptor kept per step would be 200 more. The host's engine client keeps a pool of
    # connections per worker, which may grow with the threads that served these streams
    # (each step hands one connection over to its stream), so a few more stay open.
    wait_until(lambda: server_fds(host) - theirs < 40, 20, "the host kept descriptors")


# -- a host hostile to its caller --------------------------------------------------------------

Script = Callable[[socket.socket, threading.Event], None]


class HostileHost:
    """A host on loopback that answers the upgrade with a 101, then runs ``script`` on the
    connection (plain TCP: ``Target(secure=False)``)."""

    def __init__(self, script: Script):
        self.script = script
        self.done = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         f"Upgrade: {STREAM_PROTOCOL}\r\n\r\n".encode())
            try:
                self.script(conn, self.done)
            except OSError:
                pass

    def target(self, tmp_path: Path, timeout: float = 2) -> Target:
        identity = NodeIdentity.load_or_create(tmp_path / "me")
        return Target([Endpoint("127.0.0.1", self.port, identity.node_id)], identity,
                      "a" * 64, timeout, secure=False)

    def close(self) -> None:
        self.done.set()
        self.listener.close()


def hostile(sends: bytes, then: float = 0) -> Script:
    def script(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(sends)
        done.wait(then)
    return script


def run_against(tmp_path: Path, script: Script, timeout: float = 2
                ) -> tuple[StreamProc, int, bytes, bytes, float]:
    fake = HostileHost(script)
    try:
        began = time.monotonic()
        proc = StreamProc(fake.target(tmp_path, timeout), ["true"], None, piped=True)
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        return proc, proc.wait(30), out, err, time.monotonic() - began
    finally:
        fake.close()


def test_an_exit_code_out_of_range_is_lost_not_taken(tmp_path: Path) -> None:
    for said in (b"999", b"-1", b"256", b"", b"1e2", b" 3"):
        proc, code, _, err, _ = run_against(tmp_path, hostile(fr.frame(fr.EXIT, said)))
        assert (code, proc.lost, err) == (LOST, True, b""), said
    proc, code, _, _, _ = run_against(tmp_path, hostile(fr.frame(fr.EXIT, b"7")))
    assert (code, proc.lost) == (7, False)


def test_an_exit_code_of_digits_python_cannot_read_is_lost_quietly(tmp_path: Path) -> None:
    for said in ("\u00b2".encode(), b"0" * 5000):
        proc, code, _, err, _ = run_against(tmp_path, hostile(fr.frame(fr.EXIT, said)))
        assert (code, proc.failure, err) == (LOST, None, b""), said[:10]


def test_an_error_with_terminal_escapes_is_cleaned_before_it_is_shown(tmp_path: Path) -> None:
    said = b"\x1b]0;owned\x07\x1b[2Jno such \x1b[31mthing\r\n" + b"x" * 5000
    _, code, _, err, _ = run_against(tmp_path, hostile(fr.frame(fr.ERROR, said)))
    assert code == LOST and b"the host could not run it" in err
    assert not any(c in err[:-1] for c in b"\x1b\x07\r\n") and len(err) < 600, err


def test_unknown_and_oversized_frames_end_the_stream_as_lost(tmp_path: Path) -> None:
    for sends in (b"\x09" + bytes(7), fr.frame(fr.START, b"{}"), fr.frame(fr.STDIN, b"x"),
                  b"\x01\x00\x00\x01" + bytes(4),
                  fr.frame(fr.STDOUT)[:4] + (fr.MAX_PAYLOAD + 1).to_bytes(4, "big")):
        proc, code, out, _, took = run_against(tmp_path, hostile(sends, then=30))
        assert (code, proc.lost, out) == (LOST, True, b""), sends
        assert took < 5, sends  # at once, not after the silence runs out


def test_a_host_that_says_nothing_after_the_upgrade_is_lost_within_the_timeout(
        tmp_path: Path) -> None:
    proc, code, _, _, took = run_against(tmp_path, hostile(b"", then=60), timeout=2)
    assert (code, proc.lost) == (LOST, True)
    assert took < 2 + 1 + 2  # request_timeout, a second, and slack


def test_heartbeats_alone_keep_a_stream_but_not_its_output(tmp_path: Path) -> None:
    beats = fr.frame(fr.STDOUT) * 3

    def script(conn: socket.socket, done: threading.Event) -> None:
        for _ in range(4):
            conn.sendall(beats)
            done.wait(1)
        conn.sendall(fr.frame(fr.STDOUT, b"ok") + fr.frame(fr.EXIT, b"0"))
    proc, code, out, _, took = run_against(tmp_path, script, timeout=2)
    assert (code, out) == (0, b"ok") and took > 3


def test_after_the_exit_a_removing_caller_waits_for_the_close_but_not_for_ever(
        tmp_path: Path) -> None:
    """With ``remove``, the caller waits after EXIT for the host to close (the host gives
    its place back first): it returns at the close, and a host that never closes, or keeps
    sending after EXIT, holds it at most ``CLOSE_WAIT`` (its request timeout is shorter
    here); without ``remove`` it returns at EXIT."""
    from p2prc_core.stream_shell import CLOSE_WAIT

    def closes_after(seconds: float, chatter: bool = False) -> Script:
        def script(conn: socket.socket, done: threading.Event) -> None:
            conn.sendall(fr.frame(fr.EXIT, b"3"))
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not done.is_set():
                if chatter:
                    conn.sendall(fr.frame(fr.STDOUT, b"x" * 1000))
                done.wait(0.05)
        return script

    def ran(script: Script, remove: bool) -> tuple[int, float]:
        fake = HostileHost(script)
        try:
            began = time.monotonic()
            proc = StreamProc(fake.target(tmp_path, 1), ["true"], None, piped=True,
                              remove=remove)
            assert proc.stdout is not None
            proc.stdout.read()
            return proc.wait(60), time.monotonic() - began
        finally:
            fake.close()

    code, took = ran(closes_after(1.5), remove=True)
    assert code == 3 and 1.5 <= took < CLOSE_WAIT
    code, took = ran(closes_after(60), remove=True)
    assert code == 3 and CLOSE_WAIT <= took < CLOSE_WAIT + 3
    code, took = ran(closes_after(60, chatter=True), remove=True)
    assert code == 3 and CLOSE_WAIT <= took < CLOSE_WAIT + 3
    code, took = ran(closes_after(60), remove=False)
    assert code == 3 and took < 1.5


def _tar_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fetch_from_a_host_that_never_stops(tmp_path: Path, first: bytes) -> Any:
    """A fetch of ``/w/out.bin`` from a host that sends ``first``, then zeros forever; the
    thread that fetched, once it ended (or 20 s passed)."""
    def script(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(fr.frame(fr.STDOUT, first))
        block = fr.frame(fr.STDOUT, bytes(1 << 16))
        while not done.is_set():
            conn.sendall(block)
    fake = HostileHost(script)
    try:
        shell = StreamShell(fake.target(tmp_path), "job1")
        fetching = _in_thread(lambda: shell.fetch(Output("/w/out.bin", tmp_path / "got"),
                                                  1 << 20))
        fetching.join(20)
        return fetching
    finally:
        fake.close()


def test_a_fetch_that_sends_more_than_allowed_is_cut_off(tmp_path: Path) -> None:
    header = tarfile.TarInfo("out.bin")
    header.size = 1 << 40  # a file that never ends
    fetching = _fetch_from_a_host_that_never_stops(tmp_path, header.tobuf())
    assert not fetching.is_alive(), "the fetch went on past exec_max_output"
    assert isinstance(fetching.error, P2PRCError)


def test_a_fetch_whose_host_sends_on_after_the_archive_ends_in_time(tmp_path: Path) -> None:
    fetching = _fetch_from_a_host_that_never_stops(tmp_path, _tar_of("out.bin", b"hello"))
    assert not fetching.is_alive(), "the fetch never ended"


class _Call(threading.Thread):
    def __init__(self, call: Callable[[], Any]):
        super().__init__(daemon=True)
        self.call, self.error = call, None

    def run(self) -> None:
        try:
            self.call()
        except BaseException as error:  # noqa: BLE001 - kept for the test to look at
            self.error = error  # type: ignore[assignment]


def _in_thread(call: Callable[[], Any]) -> _Call:
    each = _Call(call)
    each.start()
    return each
