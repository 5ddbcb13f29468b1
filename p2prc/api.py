"""The objects of ``import p2prc``: a node's home, its peers, containers and runs."""

from __future__ import annotations

import contextlib
import html
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2prc_core.config import ConfigError, Settings, default_home, load_settings
from p2prc_core.directory import PeerRow
from p2prc_core.errors import P2PRCError
from p2prc_core.models import parse_duration, parse_size
from p2prc_core.my_containers import RemoteContainer
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.services import NodeServices
from p2prc_core.tasks import HostResult
from p2prc_core.text import clean, format_when, human_bytes


def _html(text: object) -> str:
    """Text for a notebook: cleaned as the CLI cleans it (no escape sequences or control
    characters: peers choose their names), then escaped (no markup)."""
    return html.escape(clean(text))


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """An HTML table for a notebook; every cell cleaned and escaped."""
    head = "".join(f"<th>{_html(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_html(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class Peer(PeerRow):
    """A peer in this node's table, as ``p2prc peers ls`` shows it (``PeerRow``), shown in
    a notebook as a table. What its record says (GPUs, memory, CPUs) is its own claim,
    checked for type only."""

    @classmethod
    def from_row(cls, row: PeerRow) -> Peer:
        return cls(**{f.name: getattr(row, f.name) for f in fields(PeerRow)})

    def _cells(self) -> tuple[Any, ...]:
        return (self.name, self.node_id, self.address,
                f"{self.latency_ms:.1f} ms" if self.latency_ms is not None else "-",
                ", ".join(self.gpus) + f" ({self.gpus_free} free)" if self.gpus else "-",
                human_bytes(self.memory) if self.memory else "-", self.trusted or "-",
                {True: "yes", False: "no", None: "-"}[self.can_host])

    _HEADERS = ("name", "node id", "address", "latency", "gpus", "memory", "trusted as",
                "hosts you")

    def __str__(self) -> str:
        """As ``print`` shows it: cleaned as the CLI cleans a peer's words."""
        latency = f", {self.latency_ms:.1f} ms" if self.latency_ms is not None else ""
        return clean(f"{self.name or '(no name)'} ({self.node_id}) at {self.address}{latency}")

    def _repr_html_(self) -> str:
        return _table(self._HEADERS, [self._cells()])


class Peers(list[Peer]):
    """Peers, best first; a notebook shows them as a table."""

    def _repr_html_(self) -> str:
        return _table(Peer._HEADERS, [p._cells() for p in self])


@dataclass(frozen=True)
class CommandResult:
    """What a command run in a container gave."""

    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> CommandResult:
        """This result, or P2PRCError when the command failed (its exit code and stderr)."""
        if self.returncode != 0:
            raise P2PRCError(f"{self.command!r} exited {self.returncode}: "
                             f"{self.stderr.strip()[-500:]}")
        return self


HostRun = HostResult  # one container's part of a run, as the run's record keeps it


@dataclass(frozen=True)
class ExecResult:
    """What ``Node.exec`` gave: the command's exit code (the worst, on several containers;
    255: the connection was lost), its output, the files that came back, and the lines
    ``p2prc exec`` would have told the user (which peer and why, an output refused, ...)."""

    job_id: str  # the job (the first one's, on several containers)
    exit_code: int
    stdout: str  # on several containers, each line prefixed with its host: "[HOST] "
    stderr: str
    output_paths: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Run:
    """A playbook's run on containers, as ``p2prc runs show`` shows it."""

    id: str
    playbook: str
    succeeded: bool
    started: float
    finished: float
    variables: dict[str, Any]
    artifacts: Path
    hosts: dict[str, HostRun]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Run:
        hosts = {name: HostResult.from_json(name, h)
                 for name, h in (record.get("hosts") or {}).items()}
        return cls(id=record["id"], playbook=record["playbook"],
                   succeeded=bool(record.get("succeeded")), started=record.get("started", 0),
                   finished=record.get("finished", 0), variables=record.get("variables", {}),
                   artifacts=Path(record.get("artifacts", "")), hosts=hosts)

    def _repr_html_(self) -> str:
        title = (f"<p>run {_html(self.id)} of {_html(self.playbook)}: "
                 f"{'succeeded' if self.succeeded else 'failed'}</p>")
        return title + _table(("host", "status", "ok", "changed", "failed", "failed task"),
                              [(h.name, h.status, h.ok, h.changed, h.failed, h.task or "-")
                               for h in self.hosts.values()])


class Container:
    """A container this node started on a peer: log in, run commands, forward ports."""

    def __init__(self, node: Node, remote: RemoteContainer, state: str | None = None):
        self._node = node
        self.remote = remote
        self.state = state

    id = property(lambda self: self.remote.id)
    short_id = property(lambda self: self.remote.short_id)
    host = property(lambda self: self.remote.endpoint, doc="its host's p2prc server")
    ports = property(lambda self: list(self.remote.ports))
    gpus = property(lambda self: list(self.remote.gpus), doc="the host's indexes of its GPUs")
    expires = property(lambda self: self.remote.expires)

    def ssh_command(self, direct: bool = False) -> list[str]:
        """The ssh command line that logs in (through the host's p2prc port unless
        ``direct``), with the container's host key pinned."""
        return self._node.services.on_peers.ssh_argv(self.remote, direct)

    def run(self, command: str, timeout: float | None = 300, check: bool = False,
            direct: bool = False) -> CommandResult:
        """Run ``command`` (a shell line) in the container over SSH; its output and exit
        code. ``check``: raise P2PRCError if it fails.

        :raises P2PRCError: ssh cannot be run, or the command outlived ``timeout``.
        """
        try:
            done = subprocess.run([*self.ssh_command(direct), command], capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise P2PRCError("ssh is not installed (the OpenSSH client)") from None
        except subprocess.TimeoutExpired:
            raise P2PRCError(f"{command!r} in {self.short_id} ran past {timeout:g} s") \
                from None
        result = CommandResult(command, done.returncode, done.stdout, done.stderr)
        if done.returncode == 255 and not done.stdout:  # ssh's own failure
            raise P2PRCError(f"cannot log into {self.short_id}: {done.stderr.strip()[-300:]}")
        return result.check() if check else result

    @contextlib.contextmanager
    def forward(self, port: int, local_port: int = 0) -> Iterator[int]:
        """Serve ``port`` of the container on 127.0.0.1 while the ``with`` block runs;
        yields the local port (any free one unless ``local_port``).

        :raises P2PRCError: the container has no such port, or the local port is taken.
        """
        ready, stop = threading.Event(), threading.Event()
        found: dict[str, Any] = {}

        def started(bound: int) -> None:
            found["port"] = bound
            ready.set()

        def serve() -> None:
            try:
                self._node.services.on_peers.forward(self.remote, port, local_port, started,
                                            stop=stop)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                found["error"] = err
                ready.set()

        thread = threading.Thread(target=serve, name=f"p2prc-forward-{port}", daemon=True)
        thread.start()
        ready.wait()
        if "error" in found:
            raise P2PRCError(f"cannot forward port {port} of {self.short_id} to "
                             f"127.0.0.1:{local_port or 'any port'}: {found['error']}")
        try:
            yield int(found["port"])
        finally:
            stop.set()
            thread.join(timeout=10)

    def remove(self) -> bool:
        """Stop and remove the container on its host, and forget it; False if the host had
        removed it already."""
        return self._node.services.on_peers.remove(self.remote)

    def __repr__(self) -> str:
        return clean(f"<Container {self.short_id} on {self.host}"
                     + (f", {self.state}" if self.state else "")
                     + f", until {format_when(self.expires)}>")

    def _repr_html_(self) -> str:
        return _table(("id", "host", "state", "ports", "gpus", "expires"),
                      [(self.short_id, self.host, self.state or "-",
                        ", ".join(str(p["external"]) for p in self.ports),
                        ", ".join(map(str, self.gpus)) or "-", format_when(self.expires))])


class Node:
    """A p2prc node's home (its key, peer table, containers and runs), as the command line
    uses it. Open one with ``Node.open()``."""

    def __init__(self, services: NodeServices):
        self.services = services

    @classmethod
    def open(cls, home: str | Path | None = None, **settings: Any) -> Node:
        """The node whose home is ``home`` ($P2PRC_HOME, or ~/.p2prc, by default), made if
        it does not exist; ``settings`` override its config.toml (``request_timeout=5``).

        :raises P2PRCError: a config that does not parse, or an unknown setting.
        """
        where = Path(home).expanduser() if home is not None else default_home()
        try:
            loaded = load_settings(where, settings)
            for warning in loaded.warnings:  # a P2PRC_ variable that sets nothing: a typo?
                warnings.warn(warning, stacklevel=2)
            hooks = make_plugin_manager(disabled=loaded.settings.disable_plugins,
                                        home=loaded.home)
            return cls(NodeServices(loaded.settings, where, hooks, notice=lambda line: None))
        except ConfigError as err:
            raise P2PRCError(str(err)) from None
        except OSError as err:
            raise P2PRCError(f"cannot open {where} as a node's home: {err.strerror}") \
                from None

    @property
    def node_id(self) -> str:
        return self.services.identity.node_id

    @property
    def home(self) -> Path:
        return self.services.home

    @property
    def settings(self) -> Settings:
        return self.services.settings

    # -- peers ---------------------------------------------------------------------------

    def peers(self, gpu: bool = False, min_memory: int | str | None = None,
              min_free_memory: int | str | None = None,
              max_latency_ms: float | None = None, reachable: bool = False,
              can_host: bool | None = None) -> Peers:
        """The peer table, best first (those that said they would host this node, then by
        the ``p2prc_score_peer`` hooks). Filters: ``gpu`` (a free GPU, as its record says),
        ``min_memory`` (memory its record gives, bytes or "16G"), ``max_latency_ms``,
        ``reachable`` (answered last time), ``can_host`` (True: said it would start a
        container for this node; False: said it would not; ``peers update`` asks), and
        ``min_free_memory`` (asks each remaining peer for its specs now; a peer that does
        not answer is left out)."""
        if can_host is not None and not isinstance(can_host, bool):
            raise P2PRCError(f"can_host is True, False or None, not {can_host!r}")
        rows = self.services.peers.rows(with_gpu=gpu)
        found = Peers(Peer.from_row(r) for r in rows
                      if can_host is None or r.can_host is can_host)
        if min_memory is not None:
            least = _size(min_memory)
            found = Peers(p for p in found if p.memory is not None and p.memory >= least)
        if max_latency_ms is not None:
            found = Peers(p for p in found if p.latency_ms is not None
                          and p.latency_ms <= max_latency_ms)
        if reachable:
            found = Peers(p for p in found if p.reachable)
        if min_free_memory is not None and found:
            least = _size(min_free_memory)

            def free(peer: Peer) -> int:
                try:
                    memory = self.specs(peer).get("memory")
                    available = memory.get("available") if isinstance(memory, dict) else None
                    return available if isinstance(available, int) else -1
                except P2PRCError:
                    return -1

            with ThreadPoolExecutor(max_workers=min(16, len(found))) as pool:
                have = list(pool.map(free, found))
            found = Peers(p for p, n in zip(found, have, strict=True) if n >= least)
        return found

    def peer(self, text: Peer | str) -> Peer:
        """A peer by node id, unique start of one, or name (a ``Peer``: as it is now).

        :raises P2PRCError: no such peer (with the nearest name), or more than one.
        """
        node_id = self.services.peers.node_id_of(_peer_text(text))
        for row in self.services.peers.rows():
            if row.node_id == node_id:
                return Peer.from_row(row)
        raise P2PRCError(f"no peer {text!r} in the table")

    def add_peer(self, address: str, name: str | None = None) -> Peer:
        """Add the node at ``address`` (ADDRESS[:PORT], or NODE_ID@ADDRESS[:PORT]) to the
        table, exchange tables with it and measure it; ``name`` is your own name for it.

        :raises PeerError: it cannot be reached; P2PRCError: a malformed address, or it is
            this node.
        """
        entry, _, _ = self.services.peers.add(_text(address, "address"), name)
        return self.peer(entry.node_id)

    def update(self, hops: int | None = None,
               progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
        """Ask known peers for their tables, ``hops`` deep (``update_hops`` by default);
        ``progress(done, total, hop)`` is called as peers answer. Returns what changed:
        ``added``, ``updated``, ``removed``, ``failed`` ({node id: why}) and counts."""
        hops = self.settings.update_hops if hops is None else hops
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
            raise P2PRCError(f"hops is a whole number from 0, not {hops!r}")
        return self.services.peers.update(hops, progress).as_dict()

    def specs(self, peer: Peer | str | None = None) -> dict[str, Any]:
        """A peer's specs (CPU, memory, disk, load, GPUs with ``free``), as it sends them;
        this machine's with no ``peer``."""
        if peer is None:
            return self.services.own.specs_now()
        with self.services.peers.client(_peer_text(peer)) as client:
            return client.specs()

    # -- containers ----------------------------------------------------------------------

    def touch(self, peer: Peer | str, ports: int = 0, gpu: bool | int | list[int] = False,
              image: str | None = None, cpus: float | None = None,
              memory: int | str | None = None, ttl: int | str | None = None) -> Container:
        """Start a container on ``peer`` with SSH access (this node's key) and ``ports``
        extra TCP ports. ``gpu``: True (every free GPU), a count, or the host's GPU indexes.
        ``memory`` in bytes or "2G"; ``ttl`` in seconds or "2h".

        :raises PeerRefused: the host said no (its message names why: a limit, no GPU free,
            not trusted); PeerError: it cannot be reached; Refusal: the request is malformed
            (nothing was sent).
        """
        started = self.services.on_peers.touch(
            _peer_text(peer), ports=ports, gpu=gpu, image=image, cpus=cpus,
            memory=None if memory is None else _size(memory),
            ttl=None if ttl is None else _duration(ttl))
        return Container(self, started, "running")

    def containers(self) -> list[Container]:
        """The containers this node started, each with its state as its host tells it
        (running, gone, expired, unreachable)."""
        return [Container(self, remote, state)
                for remote, state in self.services.on_peers.states()]

    def container(self, text: str) -> Container:
        """A container this node started, by id or unique start of one (4 characters+).

        :raises P2PRCError: none or several match.
        """
        return Container(self, self.services.tracked.find(text))

    # -- runs ----------------------------------------------------------------------------

    def run_playbook(self, playbook: str, on: list[Container | str],
                     variables: dict[str, Any] | None = None,
                     on_event: Callable[[str, str, str], None] | None = None) -> Run:
        """Run an installed playbook bundle on containers (or group names); returns the
        run with each host's result. ``on_event(host, task, status)`` follows it live.

        :raises P2PRCError: an unknown playbook or container, or a bundle that would run
            code outside its containers.
        """
        names = [c.id if isinstance(c, Container) else c for c in on]
        return Run.from_record(self.services.runs.run(playbook, names, variables or {},
                                                      on_event=on_event))

    def runs(self) -> list[Run]:
        """Every run so far, oldest first."""
        return [Run.from_record(r) for r in self.services.runs.history.all()]

    # -- jobs ----------------------------------------------------------------------------

    def exec(self, command: list[str] | str, inputs: tuple[str, ...] | list[str] = (),
             outputs: tuple[str, ...] | list[str] = (), gpu: bool | int | list[int] | None = None,
             cpus: float | None = None, memory: int | str | None = None,
             image: str | None = None, env: dict[str, str] | None = None,
             workdir: str = "/job", timeout: int | str = 7200, on: str | None = None,
             out_root: str | Path = "p2prc-out") -> ExecResult:
        """Run ``command`` (an argv list, or a shell line run with ``sh -c``) as ``p2prc
        exec`` does: in a fresh container on the best peer that fits (or ``on`` a peer, a
        container or a group of yours), ``inputs`` sent ("LOCAL[:REMOTE]"), ``outputs``
        brought back ("REMOTE[:LOCAL]", by default under ``out_root``/JOB), the container
        removed. The output is captured.

        :raises P2PRCError: a missing input, no peer that fits, a malformed request.
        """
        from p2prc_core.exec_job import CaptureSink, ExecSpec, Executor, worst
        from p2prc_core.jobs import JobStore

        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        spec = ExecSpec(command=argv, inputs=tuple(inputs), outputs=tuple(outputs),
                        env=dict(env or {}), workdir=workdir, timeout=_duration(timeout),
                        gpu=gpu, cpus=cpus, memory=None if memory is None else _size(memory),
                        image=image, on=on, out_root=Path(out_root))
        sink, notes = CaptureSink(), list[str]()
        runs = Executor(self.services.on_peers, JobStore(self.home),
                        notes.append).execute(spec, sink)
        several = len(runs) > 1

        def joined(stream: str) -> str:
            if not several:
                return sink.text(runs[0].label, stream)
            return "".join(f"[{run.label}] {line}\n" for run in runs
                           for line in sink.text(run.label, stream).splitlines())

        return ExecResult(job_id=runs[0].job.id, exit_code=worst([r.exit_code for r in runs]),
                          stdout=joined("out"), stderr=joined("err"),
                          output_paths=[p for run in runs for p in run.written],
                          notes=notes)

    def __repr__(self) -> str:
        return clean(f"<p2prc Node {self.node_id} at {self.home}>")


def _whole(value: Any, parse: Callable[[str], int], what: str) -> int:
    """A whole number (a float that is one will do), or text ``parse`` reads."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return parse(value)
        except ValueError as err:
            raise P2PRCError(str(err)) from None
    raise P2PRCError(f"{what} is a whole number or text like {'2G' if what == 'a size' else '2h'}"
                     f", not {value!r}")


def _size(value: int | str) -> int:
    """Bytes, or a size as people write it ("2G"); P2PRCError for anything else."""
    return _whole(value, parse_size, "a size")


def _duration(value: int | str) -> int:
    """Seconds, or a duration as people write it ("2h"); P2PRCError for anything else."""
    return _whole(value, parse_duration, "a duration")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise P2PRCError(f"{what} must be text like 192.0.2.7:8088, not {value!r}")
    return value


def _peer_text(peer: Peer | str) -> str:
    return peer.node_id if isinstance(peer, Peer) else _text(peer, "a peer")
