"""One job's work in its container over exec streams (``POST /v1/containers/{id}/exec``):
each step one command run by the host's engine, its streams in frames (``exec_frames``)
through the host's p2prc port (and its relay), with no SSH login between. It does what
``exec_job.JobShell`` does over SSH, with the same methods, so ``Executor`` uses either;
a host without the route (an older p2prc, another backend) answers 404 or 501, and the
job goes over SSH (``NoExecRoute``). A command on a terminal (a TTY) goes over SSH too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from p2prc_core import exec_frames as fr
from p2prc_core.archive import ArchiveError, Input, Output, pack, safe_extract
from p2prc_core.errors import P2PRCError, PeerRefused
from p2prc_core.handoff import Handoff
from p2prc_core.identity import NodeIdentity
from p2prc_core.job_scripts import (
    MISSING,
    exit_code_of,
    fetch_script,
    interrupt_script,
    job_file,
    state_from,
    state_script,
    upload_script,
)
from p2prc_core.models import Endpoint
from p2prc_core.text import clean
from p2prc_core.wire import ExecStart, encode

LOST = 255  # no exit code came: the connection, not the command
_FROM_HOST = frozenset({fr.STDOUT, fr.STDERR, fr.EXIT, fr.ERROR})
_BLOCK = 1 << 16
_READ = 1 << 18  # the most one read of the stream takes (its reader holds up to twice its limit)


class NoExecRoute(P2PRCError):
    """The host has no exec streams (404 or 501): use SSH."""


@dataclass(frozen=True)
class Target:
    """A container, and how to reach its host."""

    endpoints: list[Endpoint]
    identity: NodeIdentity
    container_id: str
    timeout: float  # request_timeout: the open, and how long a silent host is waited for
    secure: bool = True


Write = Callable[[bytes | memoryview], object]


async def _run(target: Target, argv: list[str], stdin_fd: int | Handoff | None, out: Write,
               err: Write,
               opened: Callable[[BaseException | None], None],
               stopper: Callable[[Callable[[], None]], None], remove: bool = False,
               feeders: list[threading.Thread] | None = None,
               paths: list[Endpoint] | None = None) -> int:
    """Run ``argv``; its output to ``out`` and ``err``; its exit code (``LOST``: none
    came). ``opened`` is told once the stream stands (or why it did not); ``stopper`` is
    given what ends the stream early (``kill``); ``paths`` gets the path that was used."""
    from p2prc_core.tunnel_streams import open_stream

    alive = max(0.5, target.timeout / 2)
    try:
        reader, writer, first, used = await open_stream(
            target.endpoints, target.identity, f"/v1/containers/{target.container_id}/exec",
            "", target.timeout, target.secure)
    except PeerRefused as error:
        problem: BaseException = NoExecRoute(str(error)) if error.status in (404, 501) \
            else error
        opened(problem)
        raise problem from None
    except BaseException as error:
        opened(error)
        raise
    if paths is not None:
        paths.append(used)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        loop.call_soon_threadsafe(writer.close)

    stopper(stop)
    opened(None)
    try:
        start = ExecStart(argv=tuple(argv), stdin=stdin_fd is not None, alive=alive,
                          remove=remove)
        writer.write(fr.frame(fr.START, encode(start)))
        if stdin_fd is not None:
            feeder = _feed(stdin_fd, writer, loop)
            if feeders is not None:
                feeders.append(feeder)
        buffered = bytearray(first)
        ended: list[tuple[int, bytes]] = []  # the EXIT or ERROR frame, once it came

        def handle(kind: int, payload: memoryview) -> bool:
            if kind == fr.STDOUT:
                if payload:
                    out(payload)  # written before the view goes: no copy of our own
            elif kind == fr.STDERR:
                err(bytes(payload))
            else:
                ended.append((kind, bytes(payload)))
            return bool(ended)

        while True:
            fr.each(buffered, _FROM_HOST, handle)
            if ended:
                kind, said = ended[0]
                if kind == fr.ERROR:
                    raise P2PRCError(f"the host could not run it: "
                                     f"{clean(said.decode(errors='replace'), 300)}")
                text = said.decode(errors="replace")
                if text.isascii() and text.isdigit() and len(text) <= 3 and int(text) <= 255:
                    opened(None)  # (again) the command's own end: not lost
                    if remove:  # the host gives our place back, then closes
                        await _closed(reader, max(CLOSE_WAIT, target.timeout))
                    return int(text)
                return LOST
            try:
                async with asyncio.timeout(2 * alive + 1):  # no task made per read
                    data = await reader.read(_READ)
            except (TimeoutError, ConnectionError, OSError):
                return LOST
            if not data:
                return LOST
            buffered += data
    except fr.FrameError:
        return LOST  # not this protocol: as good as lost
    finally:
        writer.close()


# The longest a caller waits, after the exit, for the host to close the stream: this, or its
# request timeout where that is longer (a GPU container is removed before the close).
CLOSE_WAIT = 5.0


async def _closed(reader: asyncio.StreamReader, most: float) -> None:
    """Until the host closes the stream (what else comes is dropped), or ``most`` seconds:
    a host closes it once the caller's place is given back (and a GPU container removed:
    ``exec_stream.run``), so a caller that starts its next container after this is not
    refused for the last one."""
    deadline = asyncio.get_running_loop().time() + most
    try:
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            if not await asyncio.wait_for(reader.read(1 << 16), left):
                return
    except (TimeoutError, ConnectionError, OSError):
        return


def _feed(source: int | Handoff, writer: asyncio.StreamWriter,
          loop: asyncio.AbstractEventLoop) -> threading.Thread:
    """Our stdin (``source``: a descriptor, or what this process hands over) to the command,
    in a thread of its own: a daemon, which a stdin nobody closes never holds up our exit.
    Each frame waits for room (back pressure). A handoff is closed when the stream ends, so
    its writer stops at once."""
    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    read = source.read if isinstance(source, Handoff) else \
        (lambda size: os.read(source, size))

    def carry() -> None:
        try:
            while data := read(fr.MAX_PAYLOAD // 4):
                asyncio.run_coroutine_threadsafe(send(fr.frame(fr.STDIN, data)), loop).result()
            asyncio.run_coroutine_threadsafe(send(fr.frame(fr.STDIN_END)), loop).result()
        except (OSError, RuntimeError, ConnectionError, concurrent.futures.CancelledError):
            pass  # the stream ended first
        finally:
            if isinstance(source, Handoff):
                source.close()

    thread = threading.Thread(target=carry, daemon=True)
    thread.start()
    return thread


def _writer(fd: int) -> Write:
    def write(data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write


class StreamProc:
    """A command running over an exec stream, as much of a ``subprocess.Popen`` as
    ``Executor`` uses: ``stdout``/``stderr`` (pipes, when asked), ``poll``, ``wait``,
    ``kill``, ``returncode``. Made once the stream stands (else it raises)."""

    def __init__(self, target: Target, argv: list[str], stdin_fd: int | Handoff | None = None,
                 out_fd: int | None = 1, err_fd: int | None = 2, piped: bool = False,
                 remove: bool = False, handed: bool = False):
        self.returncode: int | None = None
        self.lost = True  # no exit code came (yet): the connection, not the command
        self.feeders: list[threading.Thread] = []  # what reads stdin_fd, once it started
        self.paths: list[Endpoint] = []  # the path to the host that the stream took
        self.remove = remove
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self.failure: BaseException | None = None
        ends: list[int] = []
        handoff = Handoff() if piped and handed else None  # stdout with no pipe: ``fetch``
        if piped:
            r_err, err_fd = os.pipe()
            self.stderr = open(r_err, "rb", 0)
            ends = [err_fd]
            if handoff is not None:
                self.stdout, out_fd = cast(IO[bytes], handoff), None
            else:
                r_out, out_fd = _wide_pipe()
                self.stdout = open(r_out, "rb", 0)
                ends.append(out_fd)
        out: Write = handoff.write if handoff is not None else \
            _writer(out_fd) if out_fd is not None else (lambda _: None)
        err = _writer(err_fd) if err_fd is not None else (lambda _: None)
        self._done = threading.Event()
        self._stop: Callable[[], None] = lambda: None
        ready = threading.Event()
        said: list[BaseException | None] = []

        def opened(problem: BaseException | None) -> None:
            if ready.is_set():  # the second call: the EXIT frame came
                self.lost = False
                return
            said.append(problem)
            ready.set()

        def stopper(stop: Callable[[], None]) -> None:
            self._stop = stop

        def main() -> None:
            try:
                self.returncode = asyncio.run(_run(target, argv, stdin_fd, out, err, opened,
                                                   stopper, remove, self.feeders, self.paths))
            except BaseException as error:  # noqa: BLE001 - kept for whoever waits
                self.failure = error
                self.returncode = LOST
                if not ready.is_set():
                    opened(error)
                else:  # said where the command's errors go: why it has no exit code
                    try:
                        err(f"p2prc: {error}\n".encode())
                    except OSError:
                        pass
            finally:
                for end in ends:
                    os.close(end)
                if handoff is not None:
                    handoff.end()
                if isinstance(stdin_fd, Handoff):  # its writer stops, fed or not
                    stdin_fd.close()
                self._done.set()

        threading.Thread(target=main, daemon=True).start()
        ready.wait()
        if said and said[0] is not None:
            self._done.wait()
            raise said[0]

    @property
    def path(self) -> Endpoint | None:
        """How the stream reached the host (through a relay, or not)."""
        return self.paths[0] if self.paths else None

    @property
    def host_removes(self) -> bool:
        """Whether the host removes the container now: asked to, and the command ended."""
        return self.remove and self._done.is_set() and not self.lost

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("exec stream", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """End the stream now (the command runs on, or not, as its host sees fit)."""
        if self._done.is_set():
            return
        try:
            self._stop()
        except RuntimeError:
            pass  # its loop closed meanwhile: it ended by itself


def _not_taken(inputs: bool, code: int, said: bytes) -> P2PRCError:
    """Why the container did not take the inputs (or make the work folder): what the
    command said, else what its exit code tells."""
    what = "the inputs could not be unpacked in the container" if inputs else \
        "the work folder could not be made in the container"
    text = clean(said.decode(errors="replace").strip()[-300:], 300)
    if text:
        return P2PRCError(f"{what} ({text})")
    if code == LOST:  # no exit code came
        why = ("its stream ended before it was done: the container removed, or the "
               "connection to its host lost")
    elif code >= 128:
        why = f"it was ended by signal {code - 128} (the container stopped, or out of memory)"
    else:
        why = f"it ended with exit {code} and said nothing"
    return P2PRCError(f"{what}: {why}")


def _sh(line: str) -> list[str]:
    return ["sh", "-c", line]


@dataclass
class StreamShell:
    """``JobShell``'s steps over exec streams; no connection is held between them."""

    target: Target
    job_id: str
    errors: list[str] = field(default_factory=list)
    host_removed: bool = False  # a fetch asked the host to remove the container, and it will

    def open(self, wait: float) -> None:
        """Nothing to open: each step makes its own stream."""

    def quick(self, remote: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """Run a short remote line; its output captured (``LOST`` and the reason in stderr
        when the host could not be reached). :raises NoExecRoute: no exec streams there."""
        try:
            proc = StreamProc(self.target, _sh(remote), None, piped=True)
        except NoExecRoute:
            raise
        except (P2PRCError, OSError) as error:
            return subprocess.CompletedProcess([], LOST, b"", str(error).encode())
        assert proc.stdout is not None and proc.stderr is not None
        out, err = _Drained(proc.stdout), _Drained(proc.stderr)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return subprocess.CompletedProcess([], LOST, b"", b"no answer in time")
        return subprocess.CompletedProcess([], code, out.result(), err.result())

    def upload(self, inputs: list[Input], workdir: str) -> None:
        """Make WORKDIR and unpack the inputs in place (``tar -x -C /``), streamed.

        :raises P2PRCError: the container did not take them.
        """
        remote = upload_script(workdir, bool(inputs))
        if not inputs:
            done = self.quick(remote)
        else:
            source = Handoff()  # the archive, packed here, to the stream's thread: no pipe
            proc, code = None, LOST
            try:
                proc = StreamProc(self.target, _sh(remote), source, piped=True)
                assert proc.stderr is not None and proc.stdout is not None
                said, _ = _Drained(proc.stderr), _Drained(proc.stdout)
                try:
                    pack(inputs, cast(BinaryIO, source))
                except BrokenPipeError:
                    pass  # the stream ended first: the exit code and stderr say why
            finally:
                source.end()  # the end of the inputs (cut short, on an error)
                if proc is not None:
                    code = proc.wait()
                    for feeder in proc.feeders:  # at the end of its input now: it stops
                        feeder.join(10)
                source.close()
            done = subprocess.CompletedProcess([], code, b"", said.result())
        if done.returncode != 0:
            raise _not_taken(bool(inputs), done.returncode, done.stderr)

    def start(self, script: str, tty: bool, piped: bool, remove: bool = False) -> StreamProc:
        """The command, running, its output on ours or (``piped``) in pipes for a Sink; our
        stdin goes to it unless ``piped``. ``remove``: the host removes the container once
        the command ended and said so. (A TTY is SSH's: ``AutoShell`` sees to it.)"""
        if piped:
            return StreamProc(self.target, _sh(script), None, piped=True, remove=remove)
        return StreamProc(self.target, _sh(script), 0, remove=remove)

    def interrupt(self, force: bool) -> None:
        self.quick(interrupt_script(self.job_id, force), timeout=10)

    def fetch(self, output: Output, max_bytes: int, remove: bool = False) -> list[Path]:
        """Bring ``output.remote`` back into ``output.local`` through ``safe_extract``;
        ``remove``: the host removes the container once the archive is sent (unless this
        stream breaks first: ``host_removed`` says whether it will).

        :raises ArchiveError: the archive was refused; P2PRCError: it is not there, or could
            not be read.
        """
        remote, name = fetch_script(output.remote)
        proc = StreamProc(self.target, _sh(remote), None, piped=True, remove=remove,
                          handed=True)
        try:
            return self._extract(proc, output, max_bytes, name)
        finally:
            if proc.host_removes:
                self.host_removed = True

    def _extract(self, proc: StreamProc, output: Output, max_bytes: int,
                 name: str) -> list[Path]:
        assert proc.stdout is not None and proc.stderr is not None
        said = _Drained(proc.stderr)
        try:
            written = safe_extract(cast(BinaryIO, proc.stdout), output.local, max_bytes,
                                   only=name)
        except BaseException as error:
            proc.stdout.close()  # what the host still sends goes nowhere: its end
            if not isinstance(error, ArchiveError | OSError | EOFError):
                raise  # a Ctrl-C, say: the stream's thread is not left waiting on us
            if _ended(proc) == MISSING:
                raise P2PRCError(f"{output.remote} is not there: the command did not "
                                 f"make it (-o)") from None
            if isinstance(error, ArchiveError):
                raise ArchiveError(f"{output.remote}: {error}") from None
            raise P2PRCError(f"{output.remote} could not be read: {error}") from None
        code = _rest_of(proc, self.target.timeout)
        if code == MISSING:
            raise P2PRCError(f"{output.remote} is not there: the command did not make it (-o)")
        if code != 0:
            text = clean(said.result().decode(errors="replace").strip()[-300:], 300)
            raise P2PRCError(f"{output.remote} came back incomplete ({text or code})")
        return written

    def exit_code(self, timeout: float = 30) -> int | None:
        done = self.quick(f"cat {job_file(self.job_id, 'exit')} 2>/dev/null", timeout)
        return exit_code_of(done.stdout.decode(errors="replace").strip())

    def state(self) -> int | str:
        return state_from(self.quick(state_script(self.job_id)))

    def master_alive(self) -> bool:
        """Whether the host still answers: each step has its own stream, so ask it."""
        return self.quick("true", timeout=self.target.timeout).returncode == 0

    def logs(self, script: str) -> int:
        """Run ``script`` with its output on ours; its exit code."""
        return StreamProc(self.target, _sh(script), None).wait()

    def close(self) -> None:
        """Nothing held between steps."""


_HEAP_KEPT = False


def keep_freed_memory() -> None:
    """For a command's own process (``p2prc exec`` with files, ``jobs get``), before it
    copies in bulk: glibc hands freed memory back to the kernel once a little lies free at
    the top of a heap (its trim threshold, 128 KiB to start with), and the copy's next
    buffers then fault their pages in again. A 512 MiB fetch took 300,000 page faults that
    way, a third of its time. The copy's buffers are reused at once, so keep what is freed
    (up to 64 MiB) for the rest of the process. It is the whole process's setting: not for
    a library's caller (``import p2prc``), whose program it would change. Nothing where the
    C library is not glibc."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return
    _HEAP_KEPT = True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD: blocks under 4 MiB come from the heap


def _wide_pipe() -> tuple[int, int]:
    """A pipe that holds 1 MiB (where Linux lets us): inputs cross it in big reads."""
    read_end, write_end = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass  # the default size works, only slower
    return read_end, write_end


_TRAILING_MOST = 1 << 20  # what tar may add after an archive's end (its padding is 10 KiB)


def _rest_of(proc: StreamProc, seconds: float) -> int:
    """The exit code of a fetch whose archive was read: what follows it is read and dropped
    (at most ``_TRAILING_MOST`` bytes, the command's end within ``seconds``); a host that
    sends more, or never ends, is cut off (``LOST``)."""
    stdout = proc.stdout
    assert stdout is not None

    def drop() -> None:
        taken = 0
        while chunk := stdout.read(_BLOCK):  # to the end: a full pipe would stall the stream
            taken += len(chunk)
            if taken > _TRAILING_MOST:
                proc.kill()
        stdout.close()
    reader = threading.Thread(target=drop, daemon=True)
    reader.start()
    try:
        code = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    reader.join()
    return code


def _ended(proc: StreamProc) -> int:
    """The exit code of a command whose output we stopped reading: what it said if it ended
    at once, else it is ended."""
    try:
        return proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class _Drained:
    """A stream read to its end in a thread of its own, kept."""

    def __init__(self, stream: IO[bytes]):
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        while chunk := stream.read(_BLOCK):
            self.data += chunk
        stream.close()

    def result(self) -> bytes:
        self.thread.join()
        return bytes(self.data)


class AutoShell:
    """Exec streams where the host has them, else SSH: ``fallback()`` makes a
    ``JobShell``, which the first step that finds no route (and a command on a terminal,
    which needs a TTY) moves every later step to. Any other method is the shell's own."""

    def __init__(self, stream: StreamShell, fallback: Callable[[], Any]):
        self.current: Any = stream
        self.fallback = fallback
        self.wait = 30.0

    def open(self, wait: float) -> None:
        self.wait = wait
        self.current.open(wait)

    def to_ssh(self) -> None:
        if isinstance(self.current, StreamShell):
            self.current = self.fallback()
            self.current.open(self.wait)

    def start(self, script: str, tty: bool, piped: bool, remove: bool = False) -> Any:
        if tty:
            self.to_ssh()
        return self.__getattr__("start")(script, tty, piped, remove)

    def __getattr__(self, name: str) -> Any:
        if not callable(getattr(self.current, name)):
            return getattr(self.current, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return getattr(self.current, name)(*args, **kwargs)
            except NoExecRoute:
                self.to_ssh()
                return getattr(self.current, name)(*args, **kwargs)
        return call
