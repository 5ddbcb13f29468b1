"""Exec streams (``POST /v1/containers/{id}/exec``): a command in one of the caller's
containers with its streams in frames, no SSH between, on the real engine (run under the
flock: see docs/contributing); hostile callers and hosts; and the fall back to SSH."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import P2PRC, LiveServer, friend_with
from p2prc_core import exec_frames as fr
from p2prc_core.errors import P2PRCError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.stream_shell import LOST, AutoShell, NoExecRoute, StreamProc, StreamShell, Target
from p2prc_core.tunnel_streams import open_stream
from p2prc_core.wire import ExecStart, WireError, decode, encode


@pytest.fixture
def host(tmp_path: Path, engine: Any) -> Iterator[LiveServer]:
    with friend_with(tmp_path, engine, P2PRC_CONTAINERS_PER_CALLER="3") as server:
        yield server


def touched(tmp_path: Path, host: LiveServer, home: str = "me") -> str:
    done = subprocess.run([P2PRC, "touch", host.peer(), "--json"], capture_output=True,
                          text=True, timeout=120, env={**os.environ,
                                                       "P2PRC_HOME": str(tmp_path / home)})
    assert done.returncode == 0, done.stderr
    container_id: str = json.loads(done.stdout)["id"]
    return container_id


def target(tmp_path: Path, host: LiveServer, container_id: str, home: str = "me",
           timeout: float = 10) -> Target:
    identity = NodeIdentity.load_or_create(tmp_path / home)
    return Target([Endpoint("127.0.0.1", host.port, host.node_id)], identity, container_id,
                  timeout)


def running(engine: Any, container_id: str) -> bool:
    return bool(engine.api.containers(all=True, filters={"id": container_id}))


def raw_stream(t: Target, first: bytes, wait_for: int = fr.EXIT, seconds: float = 20
               ) -> list[tuple[int, bytes]]:
    """Open an exec stream, send ``first`` as it is, and read frames until ``wait_for``
    (or ERROR, or the end)."""
    async def go() -> list[tuple[int, bytes]]:
        reader, writer, early, _ = await open_stream(
            t.endpoints, t.identity, f"/v1/containers/{t.container_id}/exec", "", t.timeout)
        writer.write(first)
        got, buffered = [], bytearray(early)
        try:
            async with asyncio.timeout(seconds):
                while True:
                    got += fr.frames(buffered, frozenset(range(7)), 1 << 24)
                    if any(kind in (wait_for, fr.ERROR) for kind, _ in got):
                        return got
                    try:
                        data = await reader.read(1 << 16)
                    except ConnectionError:  # a host that closed on us with bytes unread
                        return got
                    if not data:
                        return got
                    buffered += data
        finally:
            writer.close()
    return asyncio.run(go())


def start_frame(argv: list[str], **fields: Any) -> bytes:
    return fr.frame(fr.START, json.dumps({"argv": argv, **fields}).encode())


# -- on the real engine ------------------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.integration
def test_a_command_runs_with_its_stdin_its_two_streams_and_its_exit_code(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))
    read_end, write_end = os.pipe()
    os.write(write_end, b"one\ntwo\n")
    os.close(write_end)
    proc = StreamProc(t, ["sh", "-c", "wc -l; echo oops >&2; exit 7"], read_end, piped=True)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert (proc.wait(30), out.strip(), err) == (7, b"2", b"oops\n")
    assert proc.lost is False
    os.close(read_end)


@pytest.mark.docker
@pytest.mark.integration
def test_only_the_owner_may_run_commands_in_a_container(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    from p2prc_core.trust import TrustStore

    container_id = touched(tmp_path, host)
    other = NodeIdentity.load_or_create(tmp_path / "other")
    TrustStore(host.home).add(other.node_id, "other")  # trusted, but not its container
    with pytest.raises(NoExecRoute, match="404"):  # as if it did not exist: nothing told
        StreamProc(target(tmp_path, host, container_id, home="other"), ["true"])
    with pytest.raises(NoExecRoute, match="404"):
        StreamProc(target(tmp_path, host, "0" * 64), ["true"])


@pytest.mark.docker
@pytest.mark.integration
def test_hostile_start_frames_get_a_clear_error_and_run_nothing(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))
    cases = {
        fr.frame(fr.STDIN, b"x"): "must begin with a START frame",
        fr.frame(fr.START, b"{"): "not JSON",
        start_frame([]): "argv must be a list",
        start_frame(["sh", "a\0b"]): "argv must be a list",
        start_frame(["true"], shell="rm -rf /"): "shell",  # unknown fields are refused
        start_frame(["true"], alive=0): "alive must be",
        fr.frame(fr.START, b" " * (fr.MAX_START + 1)): "at most",
        b"\x04\x01\x00\x00" + bytes(4): "unknown kind",
    }
    for first, said in cases.items():
        got = raw_stream(t, first)
        assert [kind for kind, _ in got] == [fr.ERROR], (first[:20], got)
        assert said in got[0][1].decode(), (first[:20], got)
    # A START then a frame of a kind a caller may not send: the stream ends, no EXIT.
    got = raw_stream(t, start_frame(["sleep", "5"], stdin=True) + fr.frame(fr.EXIT, b"0"))
    assert fr.EXIT not in [kind for kind, _ in got]
    # An oversized STDIN frame likewise.
    got = raw_stream(t, start_frame(["cat"], stdin=True) +
                     fr.frame(fr.STDIN, b"x" * (fr.MAX_PAYLOAD + 1)))
    assert fr.EXIT not in [kind for kind, _ in got]


@pytest.mark.docker
@pytest.mark.integration
def test_a_silent_command_gets_heartbeats_and_a_dead_stream_is_lost(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    t = target(tmp_path, host, touched(tmp_path, host))
    got = raw_stream(t, start_frame(["sleep", "2.5"], alive=0.5))
    beats = [payload for kind, payload in got if kind == fr.STDOUT]
    assert len(beats) >= 2 and set(beats) == {b""}  # empty frames while it was silent
    assert got[-1] == (fr.EXIT, b"0")


@pytest.mark.docker
@pytest.mark.integration
def test_remove_takes_the_container_once_the_exit_went_out_and_not_before(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    container_id = touched(tmp_path, host)
    t = target(tmp_path, host, container_id)
    # The caller leaves before the command ends: the container stays (a lost job is got
    # later).
    proc = StreamProc(t, ["sleep", "30"], None, piped=True, remove=True)
    proc.kill()
    assert proc.wait(30) == LOST and proc.lost and not proc.host_removes
    assert running(engine, container_id)
    # The command ends and says so: the host removes it, without the caller waiting.
    proc = StreamProc(t, ["sh", "-c", "exit 3"], None, piped=True, remove=True)
    assert proc.wait(30) == 3 and proc.host_removes
    deadline = time.monotonic() + 30
    while running(engine, container_id):
        assert time.monotonic() < deadline, "the host did not remove the container"
        time.sleep(0.1)
    listed = subprocess.run([P2PRC, "server", "containers", "ls", "--json"], text=True,
                            capture_output=True, env={**os.environ, "P2PRC_HOME": str(host.home)})
    assert container_id not in listed.stdout  # its lease went with it


@pytest.mark.docker
@pytest.mark.integration
def test_exec_runs_over_the_stream_with_no_ssh_login(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    (tmp_path / "in.txt").write_text("abc")
    done = subprocess.run([P2PRC, "exec", "--on", host.peer(), "-i", "in.txt", "-o", "out.txt",
                           "--", "sh", "-c", "rev in.txt > out.txt; cat out.txt"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    assert done.returncode == 0 and done.stdout == "cba", done.stderr
    [out] = (tmp_path / "p2prc-out").glob("*/out.txt")
    assert out.read_text() == "cba"
    assert "tunnel to" not in host.output()  # no SSH tunnel was opened: streams only
    assert "exec in" in host.output()


# -- without an engine -------------------------------------------------------------------------

def test_frames_refuse_unknown_kinds_padding_and_oversized_payloads() -> None:
    data = bytearray(fr.frame(fr.STDOUT, b"a") + fr.frame(fr.STDERR, b"bc") + b"\x01\x00")
    assert fr.frames(data, frozenset({1, 2})) == [(1, b"a"), (2, b"bc")]
    assert data == bytearray(b"\x01\x00")  # a part frame waits for the rest
    for bad in (b"\x09" + bytes(7), b"\x01\x00\x01\x00" + bytes(4),
                fr.frame(fr.STDOUT)[:4] + (fr.MAX_PAYLOAD + 1).to_bytes(4, "big")):
        with pytest.raises(fr.FrameError):
            fr.frames(bytearray(bad), frozenset({1, 2}))


def test_each_frame_is_handed_out_in_place_then_cut_off_at_once() -> None:
    """What the exec client uses for output: a view of each payload (no copy), the frames
    handled cut off together, a part frame kept, and a stop when the handler says so."""
    part = fr.frame(fr.STDOUT, b"efg")[:10]
    data = bytearray(fr.frame(fr.STDOUT, b"a") + fr.frame(fr.EXIT, b"0") +
                     fr.frame(fr.STDOUT, b"d") + part)
    seen: list[tuple[int, bytes]] = []

    def note(kind: int, payload: memoryview) -> bool:
        seen.append((kind, bytes(payload)))
        return kind == fr.EXIT

    fr.each(data, frozenset({fr.STDOUT, fr.EXIT}), note)
    assert seen == [(fr.STDOUT, b"a"), (fr.EXIT, b"0")]  # stopped after the EXIT
    assert data == fr.frame(fr.STDOUT, b"d") + part
    fr.each(data, frozenset({fr.STDOUT}), note)
    assert seen[-1] == (fr.STDOUT, b"d") and data == part  # the part frame waits
    data = bytearray(fr.frame(fr.STDOUT, b"x") + fr.frame(9, b"y"))
    with pytest.raises(fr.FrameError):
        fr.each(data, frozenset({fr.STDOUT}), note)
    assert seen[-1] == (fr.STDOUT, b"x") and data == fr.frame(9, b"y")  # handled, then cut

    def fail(kind: int, payload: memoryview) -> bool:  # a write that failed: its view
        rest = payload[1:]  # stays in the traceback, and the buffer cannot be cut
        raise BrokenPipeError(f"reader gone with {len(rest)} bytes left")

    data = bytearray(fr.frame(fr.STDOUT, b"abc") + fr.frame(fr.STDOUT, b"d"))
    with pytest.raises(BrokenPipeError):  # the handler's error is what is said
        fr.each(data, frozenset({fr.STDOUT}), fail)
    kept: list[memoryview] = []

    def keep(kind: int, payload: memoryview) -> bool:
        kept.append(payload)
        return False

    fr.each(bytearray(fr.frame(fr.STDOUT, b"z")), frozenset({fr.STDOUT}), keep)
    with pytest.raises(ValueError):  # a view kept past its call is released: never stale
        bytes(kept[0])


def test_exec_start_is_checked_where_it_arrives() -> None:
    assert decode(encode(ExecStart(argv=("true",))), ExecStart).argv == ("true",)
    for body in (b'{"argv": ["true"], "stdin": "yes"}', b'{"argv": ["true"] , "x": 1}',
                 b'{"argv": [""]}', b'{"argv": ["true"], "alive": 601}'):
        with pytest.raises(WireError):
            decode(body, ExecStart)


class _NoRoute(StreamShell):
    def quick(self, remote: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        raise NoExecRoute("refused (404): no such route")


class _Ssh:
    opened = 0.0

    def open(self, wait: float) -> None:
        self.opened = wait

    def quick(self, remote: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess([], 0, b"over ssh", b"")


def test_a_host_with_no_exec_route_moves_every_step_to_ssh(tmp_path: Path) -> None:
    t = Target([], NodeIdentity.load_or_create(tmp_path / "me"), "a" * 64, 5)
    shell = AutoShell(_NoRoute(t, "job1"), _Ssh)
    shell.open(wait=12)
    assert shell.quick("true").stdout == b"over ssh"
    assert isinstance(shell.current, _Ssh) and shell.current.opened == 12
    assert shell.quick("true").stdout == b"over ssh"  # stays there


def test_a_refusal_other_than_no_route_is_not_hidden_by_ssh(tmp_path: Path) -> None:
    t = Target([Endpoint("127.0.0.1", 9, "a" * 26)], NodeIdentity.load_or_create(tmp_path / "m"),
               "a" * 64, 2)
    with pytest.raises(P2PRCError) as caught:  # nothing listens: unreachable, not 404
        StreamProc(t, ["true"])
    assert not isinstance(caught.value, (NoExecRoute, PeerRefused))
