"""One job's work inside its container, through the host's p2prc port (so it works through
relays): inputs in as a tar stream, the command with its output live, Ctrl-C passed on,
outputs back as a tar stream that is checked before anything is written
(``archive.safe_extract``). The steps go over exec streams (``stream_shell``), or over SSH
(``JobShell`` here: one OpenSSH ControlMaster per job, through the tunnel ``p2prc ssh``
uses) for a command on a terminal and for a host without exec streams.

``Executor`` (at the end) decides where a job runs, runs it, and keeps its record
(``jobs.JobStore``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, Self, cast

from p2prc_core.archive import (
    ArchiveError,
    Input,
    Output,
    container_path,
    input_size,
    pack,
    parse_input,
    parse_output,
    safe_extract,
    sweep_links,
)
from p2prc_core.directory import PeerRow
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.job_scripts import (
    MISSING,
    command_script,
    detached_script,
    exit_code_of,
    fetch_script,
    interrupt_script,
    job_file,
    logs_script,
    state_from,
    state_script,
    upload_script,
)
from p2prc_core.jobs import Job, JobStore
from p2prc_core.my_containers import RemoteContainer, Tracked
from p2prc_core.on_peers import ContainersOnPeers, Gpus
from p2prc_core.stream_shell import AutoShell, StreamShell, Target
from p2prc_core.text import clean, human_bytes
from p2prc_core.tunnel import control_path

LOST = 255  # ssh's own failure: the connection, not the command


class Sink(Protocol):
    """Where a job's output goes when it is not the terminal's: ``stream`` is ``out`` or
    ``err``; ``label`` names the job's host."""

    def write(self, label: str, stream: str, data: bytes) -> None: ...


@dataclass
class JobShell:
    """ssh into one container for one job: each call shares the job's one connection."""

    argv: list[str]  # ``ContainersOnPeers.ssh_argv``: ssh, its options, the destination
    control: Path
    alive_seconds: float  # a host silent this long is taken as lost
    job_id: str  # names the job's files in the container (``job_file``)
    errors: list[str] = field(default_factory=list)
    host_removed = False  # (over SSH, never: see ``StreamShell.host_removed``)

    def command(self, remote: str, *flags: str) -> list[str]:
        every = max(1, round(self.alive_seconds / 2))  # the first value of an option wins
        return [self.argv[0], "-o", f"ServerAliveInterval={every}", "-o",
                "ServerAliveCountMax=2", "-o", "ControlMaster=auto", "-o",
                f"ControlPath={self.control}", "-o", "ControlPersist=60", *self.argv[1:-1],
                *flags, self.argv[-1], remote]

    def open(self, wait: float) -> None:
        """Make the connection, waiting up to ``wait`` seconds for the container's sshd
        (it may still be starting). Its errors go to a file: the connection outlives this
        call, and a pipe it held would never close. It runs in a session of its own, its
        tunnel (the ProxyCommand) too: a Ctrl-C at the terminal is for the command, and must
        not cut the connection that brings the outputs back.

        :raises P2PRCError: ssh could not log in (its last words).
        """
        deadline = time.monotonic() + wait
        self.control.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with tempfile.TemporaryFile() as err:
                done = subprocess.run(self.command("true", "-T"), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=err, check=False,
                                      start_new_session=True)
                if done.returncode == 0:
                    return
                err.seek(0)
                said = clean(err.read().decode(errors="replace").strip()[-300:], 300)
            if time.monotonic() > deadline:
                raise P2PRCError(f"cannot log into the container: {said or 'ssh failed'}")
            time.sleep(0.05)  # sshd may not listen yet, right after the container started

    def quick(self, remote: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """Run a short remote line over the connection; its output captured."""
        try:
            return subprocess.run(self.command(remote, "-T"), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout, check=False,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], LOST, b"", b"no answer in time")

    def upload(self, inputs: list[Input], workdir: str) -> None:
        """Make WORKDIR and unpack the inputs in place (``tar -x -C /``), streamed.

        :raises P2PRCError: the container did not take them.
        """
        remote = upload_script(workdir, bool(inputs))
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(self.command(remote, "-T"), stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            assert proc.stdin is not None
            try:
                if inputs:
                    pack(inputs, cast(BinaryIO, proc.stdin))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the exit code and stderr say why
            code = proc.wait()
            err.seek(0)
            said = clean(err.read().decode(errors="replace").strip()[-300:], 300)
        if code != 0:
            raise P2PRCError(f"the inputs could not be unpacked in the container ({said})")

    def start(self, script: str, tty: bool, piped: bool, remove: bool = False
              ) -> subprocess.Popen[bytes]:
        """The command, running: on our terminal (``tty``), or with stdin piped through and
        its output on ours, or (``piped``) in pipes for a Sink. (``remove``: for exec
        streams; over SSH the container is removed by ``Executor.release``.)"""
        if tty:
            return subprocess.Popen(self.command(script, "-tt"))
        pipe = subprocess.PIPE if piped else None
        return subprocess.Popen(self.command(script, "-T"),
                                stdin=subprocess.DEVNULL if piped else None,
                                stdout=pipe, stderr=pipe, start_new_session=True)

    def logs(self, script: str) -> int:
        """Run ``script`` with its output on ours; ssh's exit code."""
        return subprocess.run(self.command(script, "-T"), stdin=subprocess.DEVNULL,
                              check=False).returncode

    def interrupt(self, force: bool) -> None:
        """SIGINT to the command's process group (SIGKILL when ``force``)."""
        self.quick(interrupt_script(self.job_id, force), timeout=10)

    def fetch(self, output: Output, max_bytes: int, remove: bool = False) -> list[Path]:
        """Bring ``output.remote`` back into ``output.local`` through ``safe_extract``
        (``remove`` is for exec streams: over SSH the container is removed by a request).

        :raises ArchiveError: the archive was refused (its reason); P2PRCError: it is not
            there, or could not be read.
        """
        remote, name = fetch_script(output.remote)
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(self.command(remote, "-T"), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
            assert proc.stdout is not None
            try:
                written = safe_extract(cast(BinaryIO, proc.stdout), output.local, max_bytes,
                                       only=name)
            except (ArchiveError, OSError, EOFError) as error:
                proc.kill()
                if proc.wait() == MISSING:
                    raise P2PRCError(f"{output.remote} is not there: the command did not "
                                     f"make it (-o)") from None
                if isinstance(error, ArchiveError):
                    raise ArchiveError(f"{output.remote}: {error}") from None
                raise P2PRCError(f"{output.remote} could not be read: {error}") from None
            finally:
                proc.stdout.close()
            code = proc.wait()
            err.seek(0)
            said = clean(err.read().decode(errors="replace").strip()[-300:], 300)
        if code == MISSING:
            raise P2PRCError(f"{output.remote} is not there: the command did not make it (-o)")
        if code != 0:
            raise P2PRCError(f"{output.remote} came back incomplete ({said or code})")
        return written

    def exit_code(self, timeout: float = 30) -> int | None:
        """The command's exit code from its ``exit`` file; None while it runs (or if it
        never ran, was killed, or the container did not answer)."""
        done = self.quick(f"cat {job_file(self.job_id, 'exit')} 2>/dev/null", timeout)
        return exit_code_of(done.stdout.decode(errors="replace").strip())

    def state(self) -> int | str:
        """The command as its container tells: its exit code, ``running`` (the shell that
        waits for it is alive), or ``gone`` (it ended without one: killed).

        :raises P2PRCError: the container did not answer."""
        return state_from(self.quick(state_script(self.job_id)))

    def master_alive(self) -> bool:
        """Whether the job's connection (its ControlMaster) still stands; asks no host."""
        try:
            return subprocess.run([self.argv[0], "-o", f"ControlPath={self.control}", "-O",
                                   "check", self.argv[-1]], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=5, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        """End the job's connection (its ControlMaster); one that does not answer in time is
        left to end on its own (ControlPersist)."""
        try:
            subprocess.run([self.argv[0], "-o", f"ControlPath={self.control}", "-O", "exit",
                            self.argv[-1]], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            pass


class FetchStopped(KeyboardInterrupt):
    """A third Ctrl-C while outputs come back: the fetch stops, the cleanup does not."""


class _Sigint:
    """A SIGINT handler of ours (``handle``) while in the block, set in the main thread only;
    the old one back after (one set from C, which cannot be put back, becomes Python's
    default)."""

    def __init__(self) -> None:
        self.old: Any = None
        self.installed = False

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self.handle)
            self.installed = True
        return self

    def __exit__(self, *_: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.old if self.old is not None
                          else signal.default_int_handler)

    def handle(self, signum: int, frame: object) -> None:
        raise NotImplementedError


class CtrlC(_Sigint):
    """Ctrl-C while a job runs, counted by a SIGINT handler so that nothing is done in a
    handler or an ``except``: the waiting loop passes each on. A third one while outputs
    come back stops the fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.wake = threading.Event()  # a Ctrl-C, or a command that ended
        self.fetching = False

    def handle(self, signum: int, frame: object) -> None:
        self.count += 1
        self.wake.set()
        if self.fetching and self.count >= 3:
            self.fetching = False
            raise FetchStopped()


class TouchInterrupt(_Sigint):
    """Ctrl-C while a container is being started for a job: the first is held until the
    host has answered (within the request's timeout), so that the container can be removed,
    not left running untracked until its lease ends; a second gives up at once, and leaves
    it to the host, which removes it when its lease ends."""

    def __init__(self) -> None:
        super().__init__()
        self.pressed = False

    def handle(self, signum: int, frame: object) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        try:  # straight to the descriptor: a handler must not re-enter a buffered stream
            os.write(2, b"interrupted: the container being started is removed once its host "
                        b"answers (Ctrl-C again leaves it to the host until its lease ends)\n")
        except OSError:
            pass


def pump(proc: subprocess.Popen[bytes], label: str, sink: Sink) -> list[threading.Thread]:
    """Threads that carry the command's stdout and stderr into ``sink`` as they come."""
    def carry(stream: IO[bytes] | None, name: str) -> None:
        if stream is None:
            return
        fd = stream.fileno()
        while data := os.read(fd, 1 << 16):
            sink.write(label, name, data)
        stream.close()

    threads = [threading.Thread(target=carry, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=carry, args=(proc.stderr, "err"), daemon=True)]
    for thread in threads:
        thread.start()
    return threads


class LineSink:
    """Each line prefixed with its host (``[HOST] ``), written whole to ``out`` or ``err``
    (a command on several containers at once)."""

    def __init__(self, out: Callable[[bytes], None], err: Callable[[bytes], None]):
        self.targets = {"out": out, "err": err}
        self.partial: dict[tuple[str, str], bytes] = {}
        self.lock = threading.Lock()

    def write(self, label: str, stream: str, data: bytes) -> None:
        with self.lock:
            text = self.partial.pop((label, stream), b"") + data
            *lines, rest = text.split(b"\n")
            for line in lines:
                self.targets[stream](f"[{label}] ".encode() + line + b"\n")
            if rest:
                self.partial[(label, stream)] = rest

    def flush(self) -> None:
        with self.lock:
            for (label, stream), rest in self.partial.items():
                self.targets[stream](f"[{label}] ".encode() + rest + b"\n")
            self.partial.clear()


class CaptureSink:
    """Output kept in memory per host (``import p2prc``'s ``Node.exec``)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], bytearray] = {}
        self.lock = threading.Lock()

    def write(self, label: str, stream: str, data: bytes) -> None:
        with self.lock:
            self.kept.setdefault((label, stream), bytearray()).extend(data)

    def text(self, label: str, stream: str) -> str:
        return bytes(self.kept.get((label, stream), b"")).decode(errors="replace")


# -- jobs on containers: where they run, and the run of each ----------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MARGIN = 600  # seconds a job's container outlives its --timeout (outputs, a late get)


@dataclass(frozen=True)
class ExecSpec:
    """What ``p2prc exec`` (or ``Node.exec``) was asked to do."""

    command: list[str]
    inputs: tuple[str, ...] = ()  # -i LOCAL[:REMOTE]
    outputs: tuple[str, ...] = ()  # -o REMOTE[:LOCAL]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/job"
    timeout: int = 7200
    gpu: Gpus | None = None
    cpus: float | None = None
    memory: int | None = None
    image: str | None = None
    on: str | None = None  # a peer, a tracked container, or a group of them
    spread: int = 0  # run on the N best peers at once
    keep: bool = False
    detach: bool = False
    out_root: Path = Path("p2prc-out")


@dataclass
class JobRun:
    """One job while it runs: its record, container and connection."""

    job: Job
    container: RemoteContainer
    shell: AutoShell
    outputs: list[Output]
    label: str  # its host, as lines are prefixed and outputs filed
    owned: bool  # exec started the container (and removes it)
    proc: subprocess.Popen[bytes] | None = None
    interrupts: int = 0
    written: list[Path] = field(default_factory=list)
    output_errors: list[str] = field(default_factory=list)
    finished: bool = False  # its end is recorded (``Executor.finish``), or it runs detached

    @property
    def exit_code(self) -> int:
        """What exec exits with for this job: the command's code (255: the connection was
        lost), 1 for a command that succeeded but whose outputs did not come back."""
        code = self.job.exit_code
        if code is None:
            return LOST if self.job.state == "lost" else 1
        return 1 if code == 0 and self.output_errors else code


def gpus_needed(gpu: Gpus | None) -> int:
    """How many free GPUs a peer must have for ``--gpu``."""
    if gpu is None or gpu is False:
        return 0
    if gpu is True:
        return 1
    return gpu if isinstance(gpu, int) else len(gpu)


def missing_on(row: PeerRow, spec: ExecSpec) -> str:
    """Why ``row``'s peer does not fit ``spec`` as its record says, or "" when it fits."""
    needed = gpus_needed(spec.gpu)
    if needed and row.gpus_free < needed:
        return f"has {row.gpus_free} free GPUs ({needed} asked)"
    if spec.memory and row.memory is not None and row.memory < spec.memory:
        return f"has {human_bytes(row.memory)} of memory ({human_bytes(spec.memory)} asked)"
    if spec.cpus and row.cpus is not None and row.cpus < spec.cpus:
        return f"has {row.cpus} CPUs ({spec.cpus:g} asked)"
    return ""  # one that said it will not host us is asked all the same, last (rows' order)


def why_chosen(row: PeerRow) -> str:
    """The one line that says which peer a job runs on, and why."""
    reasons = ["will host you"] if row.can_host else []
    if row.gpus_free:
        reasons.append(f"{row.gpus_free} free GPU{'s' if row.gpus_free > 1 else ''}")
    if row.latency_ms is not None:
        reasons.append(f"{row.latency_ms:.0f} ms")
    return f"on {clean(row.name, 64)}: {', '.join(reasons) or 'the best score'}"


def check_spec(spec: ExecSpec, max_input: int) -> list[Input]:
    """Everything that can be checked before a container starts: the command, -e names,
    the inputs (there, readable, within ``max_input``) and the -o paths.

    :raises P2PRCError: what is wrong, and what to do.
    """
    if not spec.command:
        raise P2PRCError("no command to run: give it after '--' (p2prc exec -- python3 x.py)")
    if not spec.workdir.startswith("/"):
        raise P2PRCError(f"-w {clean(spec.workdir, 64)!r} is not absolute: start it with '/'")
    container_path(spec.workdir, what="working folder (-w)")
    bad = [name for name in spec.env if not _ENV_NAME.fullmatch(name)]
    if bad:
        raise P2PRCError(f"-e {clean(bad[0], 64)!r}: a name is letters, digits and '_', "
                         f"not starting with a digit")
    inputs = [parse_input(text, spec.workdir) for text in spec.inputs]
    size = input_size(inputs)
    if size > max_input:
        raise P2PRCError(f"the inputs hold {human_bytes(size)}, over exec_max_input "
                         f"({human_bytes(max_input)}): send less, or raise the setting")
    for text in spec.outputs:
        parse_output(text, spec.out_root, spec.workdir)
    return inputs


def file_label(text: str) -> str:
    """A host's label made safe as a folder name and a line prefix."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", clean(text, 64)).strip("-.") or "host"


def worst(codes: list[int | None]) -> int:
    """The exit code of several jobs: the worst (a job without one counts as 1)."""
    return max((1 if code is None else code for code in codes), default=0)


class Placement:
    """Where a job runs: the user's own containers (``--on`` a container or a group), or
    fresh ones on the peer ``--on`` names, or on the best peers that fit, each refusal said
    and the next peer asked."""

    def __init__(self, on_peers: ContainersOnPeers, say: Callable[[str], None]):
        self.on_peers = on_peers
        self.say = say

    def place(self, spec: ExecSpec) -> list[tuple[RemoteContainer, bool]]:
        """The containers to run on, and whether each was started for this job: the user's
        own (``--on`` a container or a group of them), else fresh ones on the peer ``--on``
        names or on the best peers that fit."""
        tracked = self.on_peers.tracked
        if spec.on and (spec.on in tracked.groups() or _names_a_container(spec.on, tracked)):
            containers = tracked.resolve(spec.on)
            if not containers:
                raise P2PRCError(f"group {clean(spec.on, 64)!r} has no containers")
            self.on_peers.check_alive(containers)
            return [(c, False) for c in containers]
        if spec.on:
            return [(self.touch(spec.on, spec), True)]
        return self.choose(spec, max(1, spec.spread))

    def touch(self, peer: str, spec: ExecSpec) -> RemoteContainer:
        """A container started on ``peer``; a Ctrl-C meanwhile waits for it, removes it,
        and is raised then (``TouchInterrupt``)."""
        with TouchInterrupt() as interrupt:
            try:
                container = self.on_peers.touch(
                    peer, gpu=spec.gpu if spec.gpu is not None else False, image=spec.image,
                    cpus=spec.cpus, memory=spec.memory, ttl=spec.timeout + MARGIN)
            except P2PRCError:
                if interrupt.pressed:  # not the next peer: the user asked to stop
                    raise KeyboardInterrupt from None
                raise
        if interrupt.pressed:
            try:
                self.on_peers.remove(container)
            except P2PRCError as err:  # still a Ctrl-C: no next peer is asked
                self.say(f"could not remove {container.short_id} from its host "
                         f"({clean(err, 300)}): 'p2prc rm {container.short_id}' later")
            raise KeyboardInterrupt
        return container

    def choose(self, spec: ExecSpec, count: int) -> list[tuple[RemoteContainer, bool]]:
        """Containers on the ``count`` best peers that fit, asked in order; each refusal is
        said, and the next peer asked.

        :raises P2PRCError: too few fit or accepted (what each lacked or said).
        """
        rows = self.on_peers.peers.rows()
        if not rows:
            raise P2PRCError("no peers known: add a friend with 'p2prc join TOKEN' or "
                             "'p2prc peers add ADDRESS', or name one with --on")
        found: list[tuple[RemoteContainer, bool]] = []
        why_not: list[str] = []
        try:
            for row in rows:
                if len(found) == count:
                    break
                lacking = missing_on(row, spec)
                if lacking:
                    why_not.append(f"{clean(row.name, 64)} {lacking}")
                    continue
                try:
                    found.append((self.touch(row.node_id, spec), True))
                except PeerError as err:  # refused (403/409/429/503) or unreachable
                    self.say(f"{clean(row.name, 64)} did not start one: {clean(err, 300)}; "
                             f"trying the next")
                    answer = "refused" if isinstance(err, PeerRefused) else "did not answer"
                    why_not.append(f"{clean(row.name, 64)} {answer}")
                    continue
                self.say(why_chosen(row))
            if len(found) < count:
                why_not.append(f"{len(rows)} peer{'s' if len(rows) > 1 else ''} known")
                raise P2PRCError(f"no peer to run on"
                                 f"{'' if count == 1 else f' ({count} asked)'}: "
                                 + "; ".join(why_not[:6]))
        except BaseException:  # too few, an error, Ctrl-C: what was started goes back
            for container, _ in found:
                self.on_peers.remove(container)
            raise
        return found


class Executor:
    """Runs jobs: picks their containers (started for them, or the user's own), sends the
    inputs, runs the command, brings the outputs back, removes what it started, and keeps
    each job's record. ``say`` tells the user one line of what happens."""

    def __init__(self, on_peers: ContainersOnPeers, store: JobStore,
                 say: Callable[[str], None]):
        self.on_peers = on_peers
        self.store = store
        self.say = say
        self.settings = on_peers.settings
        self.ctrl_c: CtrlC | None = None  # while attached: Ctrl-C counted, not raised

    def execute(self, spec: ExecSpec, sink: Sink | None = None) -> list[JobRun]:
        """Run ``spec`` to its end (or, ``detach``, start it); the jobs, with their records
        saved. ``sink``: where output goes (None: this process's own stdout and stderr).

        :raises P2PRCError: the spec is wrong, or no container could be had (before any
            starts, for what can be checked).
        """
        inputs = check_spec(spec, self.settings.exec_max_input)
        placed = Placement(self.on_peers, self.say).place(spec)
        runs: list[JobRun] = []
        try:
            batch = ""
            labels = [self.label(c) for c, _ in placed]
            for container, owned in placed:
                label = labels[len(runs)]
                if labels.count(label) > 1:
                    label = f"{label}-{container.short_id[:6]}"
                run = self.new_run(spec, container, owned, label, batch, len(placed) > 1)
                batch = batch or run.job.id
                runs.append(run)
            with ThreadPoolExecutor(max_workers=len(runs)) as pool:
                list(pool.map(lambda run: self.prepare(run, inputs, spec), runs))
        except BaseException as err:
            for run in runs:
                self.finish(run, fetch=False, failure=str(err) or "interrupted")
            for container, owned in placed[len(runs):]:
                if owned:
                    self.on_peers.remove(container)
            raise
        try:
            if spec.detach:
                self.detach(runs, spec)
            else:
                self.attach(runs, spec, sink)
        except BaseException as err:
            for run in runs:
                if not run.finished:
                    self.finish(run, fetch=False, failure=str(err) or "interrupted")
            raise
        return runs

    def label(self, container: RemoteContainer) -> str:
        return file_label(self.on_peers.peers.names.label(container.node_id,
                                                          container.endpoint))

    def new_run(self, spec: ExecSpec, container: RemoteContainer, owned: bool, label: str,
                batch: str, several: bool) -> JobRun:
        """A job's record (saved, ``starting``) and its connection, not yet opened."""
        job_id = self.store.new_id()
        out_dir = spec.out_root / (batch or job_id)
        out_dir = out_dir / label if several else out_dir
        outputs = [parse_output(text, out_dir, spec.workdir) for text in spec.outputs]
        if several:  # each host's under LOCAL/HOST, also where LOCAL was given
            outputs = [o if o.local == out_dir else Output(o.remote, o.local / label)
                       for o in outputs]
        job = Job(id=job_id, peer_id=container.node_id or "", peer_name=label,
                  container_id=container.id, command=list(spec.command),
                  workdir=spec.workdir, out_dir=str(out_dir.absolute()), batch=batch,
                  keep=spec.keep or not owned,
                  outputs=[{"remote": o.remote, "local": str(o.local.absolute())}
                           for o in outputs])
        self.store.save(job)
        return JobRun(job, container, self.shell(container, job_id), outputs, label, owned)

    def shell(self, container: RemoteContainer, job_id: str) -> AutoShell:
        """A job's steps: over exec streams, or SSH where the host has none (or for a TTY)."""
        target = Target(self.on_peers.paths_to(container), self.on_peers.peers.identity,
                        container.id, self.settings.request_timeout, self.on_peers.peers.secure)
        return AutoShell(StreamShell(target, job_id), lambda: JobShell(
            self.on_peers.ssh_argv(container),
            control_path(self.on_peers.home, f"{job_id}-{container.short_id}"),
            self.settings.request_timeout, job_id))

    def prepare(self, run: JobRun, inputs: list[Input], spec: ExecSpec) -> None:
        """Log in (waiting for sshd) and send the inputs."""
        run.shell.open(wait=30)
        if inputs:
            run.shell.upload(inputs, spec.workdir)

    def detach(self, runs: list[JobRun], spec: ExecSpec) -> None:
        """Start each command in the background; the containers stay (one whose command
        did not start goes)."""
        for run in runs:
            script = detached_script(spec.command, self.env_of(run, runs, spec),
                                     spec.workdir, spec.timeout, run.job.id)
            done = run.shell.quick(script)
            if done.returncode != 0:
                said = clean(done.stderr.decode(errors="replace").strip()[-200:], 200)
                self.finish(run, fetch=False, failure=f"could not start the command"
                                                      f"{f' ({said})' if said else ''}")
                continue
            run.shell.close()
            run.job.state, run.finished = "detached", True
            self.store.save(run.job)

    def env_of(self, run: JobRun, runs: list[JobRun], spec: ExecSpec) -> dict[str, str]:
        return {**spec.env, "P2PRC_INDEX": str(runs.index(run)),
                "P2PRC_COUNT": str(len(runs))}

    def attach(self, runs: list[JobRun], spec: ExecSpec, sink: Sink | None) -> None:
        """Run each command to its end, output live; Ctrl-C interrupts them (a second one
        kills them, a third stops the outputs' fetch); then, whatever happened, each job's
        end is recorded and its container goes (``finish``)."""
        with CtrlC() as self.ctrl_c:
            failure = ""
            try:
                self.run_attached(runs, spec, sink)
            except BaseException as err:
                failure = str(err) or type(err).__name__
                for run in runs:
                    if run.proc is not None and run.proc.poll() is None:
                        run.proc.kill()
                        run.proc.wait()
                raise
            finally:
                for run in runs:
                    self.finish(run, fetch=not failure, failure=failure)
                self.ctrl_c = None

    def run_attached(self, runs: list[JobRun], spec: ExecSpec, sink: Sink | None) -> None:
        """Start each command, its output live, and wait for all to end."""
        tty = sink is None and len(runs) == 1 and os.isatty(0)
        lines = LineSink(_writer(1), _writer(2)) if sink is None and len(runs) > 1 else None
        pumps: list[threading.Thread] = []
        for run in runs:
            script = command_script(spec.command, self.env_of(run, runs, spec), spec.workdir,
                                    spec.timeout, run.job.id)
            # Nothing to fetch after it and nothing kept: its host removes the container
            # once the command ended (exec streams; we wait only until it gave our place
            # back, not for the engine's removal, but for a GPU container's).
            last = run.owned and not run.job.keep and not run.outputs
            run.proc = run.shell.start(script, tty, piped=(sink or lines) is not None,
                                       remove=last)
            run.job.state = "running"
            self.store.save(run.job)
            if sink or lines:
                pumps += pump(run.proc, run.label, sink or lines)  # type: ignore[arg-type]
        assert self.ctrl_c is not None
        wait_for(runs, self.ctrl_c, self.pass_on)
        for thread in pumps:
            thread.join()
        if lines:
            lines.flush()

    def pass_on(self, runs: list[JobRun], count: int) -> None:
        """The ``count``th Ctrl-C, to each command still running: SIGINT, then SIGKILL."""
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.interrupts = count
                run.shell.interrupt(force=count > 1)
        self.say("interrupted: outputs come back once the command ends"
                 + (" (killed)" if count > 1 else "; Ctrl-C again kills it"))

    def finish(self, run: JobRun, fetch: bool, failure: str = "") -> None:
        """The job's end: its state and exit code, its outputs fetched (kept from a lost
        host), its connection closed and its container removed unless kept; the last three
        also when the fetch is stopped (a third Ctrl-C) or fails."""
        run.finished = True
        try:
            settle(run, failure, max(2.0, self.settings.request_timeout), self.say,
                   relayed(run, self.on_peers))
            if fetch and run.job.state != "lost":
                self.fetch_outputs(run)
        finally:
            run.shell.close()
            if run.job.state != "lost":
                self.release(run)
            self.store.save(run.job)

    def fetch_outputs(self, run: JobRun) -> None:
        """Bring each output back; a third Ctrl-C (while attached) stops this, and the job is
        ``interrupted``."""
        try:
            for at, output in enumerate(run.outputs, 1):
                if self.ctrl_c is not None and self.ctrl_c.count >= 3:
                    raise FetchStopped()
                # The last fetch of a container nothing keeps: its host removes it once the
                # archive is sent (as a command with no outputs does), unwaited for.
                self.fetch_one(run, output, remove=at == len(run.outputs) and run.owned
                               and not run.job.keep)
        except FetchStopped:
            run.job.state = "interrupted"
            run.job.message = clean(f"outputs from {run.label} not fetched: Ctrl-C", 300)
            run.output_errors.append(run.job.message)
            self.say(run.job.message)
        finally:
            self.sweep(run)

    def sweep(self, run: JobRun) -> None:
        """Each output folder, once all outputs are in: a link that one output's archive made
        escape through another's is removed (``archive.sweep_links``)."""
        for local in dict.fromkeys(output.local for output in run.outputs):
            removed = sweep_links(local)
            if removed:
                run.job.message = clean(f"from {run.label}: links that resolved outside "
                                        f"{local} were removed: {', '.join(removed[:5])}", 600)
                run.output_errors.append(run.job.message)
                self.say(f"error: {run.job.message}")

    def fetch_one(self, run: JobRun, output: Output, remove: bool = False) -> None:
        try:
            if self.ctrl_c is not None:
                self.ctrl_c.fetching = True
            run.written += run.shell.fetch(output, self.settings.exec_max_output,
                                           remove=remove)
        except P2PRCError as err:
            run.job.message = clean(f"from {run.label}: {err}", 600)
            run.output_errors.append(run.job.message)
            self.say(f"error: {run.job.message}")
        finally:
            if self.ctrl_c is not None:
                self.ctrl_c.fetching = False

    def release(self, run: JobRun) -> None:
        if run.job.keep:
            return
        if getattr(run.proc, "host_removes", False) or run.shell.host_removed:
            self.on_peers.forget(run.container)
            return
        try:
            self.on_peers.remove(run.container)
        except P2PRCError as err:
            self.say(f"could not remove {run.container.short_id} from {run.label}: "
                     f"{clean(err, 300)} ('p2prc rm {run.container.short_id}' later)")

    # -- a job after exec returned: detached, or lost --------------------------------------------

    def reopen(self, job: Job) -> JobRun:
        """A kept job's container and connection, to read its logs or fetch its outputs.

        :raises P2PRCError: its container is gone, or its host cannot be reached."""
        try:
            container = self.on_peers.tracked.find(job.container_id)
        except P2PRCError:
            raise P2PRCError(f"job {job.id}'s container is gone ('p2prc jobs rm {job.id}' "
                             f"forgets the job)") from None
        shell = self.shell(container, job.id)
        outputs = [Output(o["remote"], Path(o["local"])) for o in job.outputs]
        run = JobRun(job, container, shell, outputs, job.peer_name, owned=not job.keep)
        try:
            shell.open(wait=self.settings.request_timeout)
        except P2PRCError as err:
            raise P2PRCError(f"cannot reach {clean(job.peer_name, 64)} for job {job.id} "
                             f"({clean(err, 300)}): try again later") from None
        return run

    def logs(self, job: Job, follow: bool) -> int:
        """Print a detached job's output (following it with ``follow``); ssh's exit code."""
        run = self.reopen(job)
        try:
            return int(run.shell.logs(logs_script(follow, job.id)))
        finally:
            run.shell.close()

    def get(self, job: Job, keep: bool = False) -> JobRun:
        """Fetch a detached or lost job's outputs and exit code, then remove its container
        (unless ``keep``, or it was the user's own).

        :raises P2PRCError: it still runs; its host cannot be reached; it is not one to get.
        """
        if job.state not in ("detached", "lost"):
            raise P2PRCError(f"job {job.id} is {job.state}: its outputs came back when it "
                             f"ended ({job.out_dir})")
        run = self.reopen(job)
        try:
            state = run.shell.state()
        except P2PRCError as err:
            run.shell.close()
            raise P2PRCError(f"cannot reach {clean(job.peer_name, 64)} for job {job.id} "
                             f"({clean(err, 300)}): try again later") from None
        if state == "running":
            run.shell.close()
            follow = (f"'p2prc jobs logs -f {job.id}' follows it" if job.state == "detached"
                      else f"wait for it to end, or 'p2prc jobs rm {job.id}' forgets it")
            raise P2PRCError(f"job {job.id} still runs on {clean(job.peer_name, 64)}: {follow}")
        code = state if isinstance(state, int) else None
        job.keep = job.keep or keep
        job.exit_code, job.ended = code, time.time()
        job.state = "done" if code == 0 else "failed"
        self.fetch_outputs(run)
        run.shell.close()
        self.release(run)
        self.store.save(job)
        return run


def relayed(run: JobRun, on_peers: ContainersOnPeers) -> str:
    """``through relay NAME`` when the job's command went through a relay, else "": a lost
    job's line names it, as the relay may be what went away."""
    path = getattr(run.proc, "path", None)  # an exec stream's; ssh's is not known
    if path is None or not path.relay:
        return ""
    return on_peers.peers.names.path_text(path.path, path.node_id)


def settle(run: JobRun, failure: str, wait: float, say: Callable[[str], None],
           via: str = "") -> None:
    """A job's state and exit code when its ssh ended. ssh's 255 is the command's own when
    its exit file, read over the job's connection (``wait`` seconds at most), says so; with
    no connection left, the connection was lost (``via``: how it reached the host)."""
    job, code = run.job, run.proc.returncode if run.proc is not None else None
    lost = getattr(run.proc, "lost", None)  # an exec stream tells; ssh's 255 does not
    if code == LOST and lost is False:
        pass  # the command's own 255
    elif code == LOST and not failure and run.shell.master_alive():
        code = run.shell.exit_code(timeout=wait)
    elif code == LOST:
        code = None
    job.ended, job.exit_code = time.time(), code
    if failure or run.proc is None:
        job.state, job.message = "failed", clean(failure or "it did not start", 300)
    elif code is None and run.interrupts > 1:
        job.state, job.exit_code = "interrupted", 137  # killed, shell and all
    elif code is None:
        job.state = "lost"
        job.message = clean(f"lost the connection to {run.label}"
                            + (f" ({via})" if via else ""), 300)
        say(f"{job.message}: 'p2prc jobs get {job.id}' fetches its outputs once it answers "
            f"again")
    else:
        job.state = "interrupted" if run.interrupts else "done" if code == 0 else "failed"


def wait_for(runs: list[JobRun], ctrl_c: CtrlC,
             pass_on: Callable[[list[JobRun], int], None]) -> None:
    """Until every command ends; each Ctrl-C that ``ctrl_c`` counted is handed to
    ``pass_on`` here, outside the signal handler (a quick second one becomes one kill)."""
    def watch(proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        ctrl_c.wake.set()

    procs = [run.proc for run in runs if run.proc is not None]
    for proc in procs:
        threading.Thread(target=watch, args=(proc,), daemon=True).start()
    passed = 0
    while any(proc.poll() is None for proc in procs):
        ctrl_c.wake.wait(1)
        ctrl_c.wake.clear()
        if ctrl_c.count > passed:
            passed = ctrl_c.count
            pass_on(runs, passed)


def _names_a_container(text: str, tracked: Tracked) -> bool:
    """Whether ``--on TEXT`` names a tracked container by its id (or 4+ digits of it)."""
    return re.fullmatch(r"[0-9a-f]{4,64}", text) is not None and \
        any(cid.startswith(text) for cid in tracked.containers())


def _writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write
