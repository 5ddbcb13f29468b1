"""One ansible-playbook process for a run: its files in the run's folder, its results read
live from p2prc's callback (``ansible_callback/p2prc_events.py``) on a pipe of its own.

The run's folder holds what the process was given and what it said:
``inventory/hosts.json``, ``env/extravars`` (private), ``artifacts/command``,
``artifacts/stdout`` (Ansible's own output), ``artifacts/job_events/N-EVENT.json`` (one per
result), ``artifacts/rc``. Nothing else stands between p2prc and Ansible: no terminal, no
second process, no wait after the play (ansible-runner's pexpect mode slept 0.1 s there).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2prc_core.errors import P2PRCError
from p2prc_core.text import clean

CALLBACKS = Path(__file__).with_name("ansible_callback")  # holds p2prc_events.py
_MAX_LINE = 1 << 20  # an event line past this is dropped (the callback cuts each text to 8K)
_EVENT = re.compile(r"[a-z_]{1,40}")
_STATS = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")
_STOP_SECONDS = 5.0  # after a Ctrl-C, how long Ansible has to end its play before a kill


@dataclass
class PlaybookEnd:
    """How ansible-playbook ended: its exit code, the recap it gave (empty where it ended
    before one), and the last line of its output (where it stopped early, the why)."""
    rc: int
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    output: Path = Path()
    last_line: str = ""


def ansible_playbook() -> str:
    """The ansible-playbook beside this Python (the same environment), else the one on PATH.

    :raises P2PRCError: there is none.
    """
    beside = Path(sys.executable).with_name("ansible-playbook")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ansible-playbook")
    if found is None:
        raise P2PRCError("ansible-playbook is not installed: pip install ansible-core")
    return found


class Playbook:
    """One ansible-playbook process, started at once. ``gated``: it reads the bundle and the
    inventory, then waits before its first play, so before it logs in anywhere, until
    ``go`` (or ends at ``cancel``): its start-up overlaps a last check of the targets.
    ``on_event`` gets each host's result as Ansible gives it (``event``, ``event_data``:
    ``host``, ``task``, ``res``, ``ignore_errors``; ``stdout``).

    :raises P2PRCError: ansible-playbook is not installed.
    """

    def __init__(self, project: Path, playbook: str, inventory: Mapping[str, Any],
                 extravars: Mapping[str, Any], run_dir: Path,
                 on_event: Callable[[dict[str, Any]], None], *, forks: int = 1,
                 limit: str | None = None, env: Mapping[str, str] | None = None,
                 gated: bool = False) -> None:
        binary = ansible_playbook()
        (run_dir / "inventory").mkdir(parents=True, exist_ok=True)
        hosts = run_dir / "inventory" / "hosts.json"
        hosts.write_text(json.dumps(inventory, indent=1))
        variables = _private(run_dir / "env" / "extravars", json.dumps(dict(extravars)))
        self.artifacts = run_dir / "artifacts"
        (self.artifacts / "job_events").mkdir(parents=True, exist_ok=True)
        argv = [binary, "-i", str(hosts), *(["--limit", limit] if limit else []),
                "-e", f"@{variables}", "--forks", str(max(1, forks)), "--", playbook]
        (self.artifacts / "command").write_text(json.dumps({"command": argv,
                                                            "cwd": str(project)}))
        self.events = _Events(self.artifacts / "job_events", on_event)
        base = {**os.environ, **(env or {})}
        child = {**base, "ANSIBLE_STDOUT_CALLBACK": "p2prc_events",
                 "ANSIBLE_CALLBACK_PLUGINS": _joined(str(CALLBACKS),
                                                     base.get("ANSIBLE_CALLBACK_PLUGINS"),
                                                     os.pathsep)}
        self.read_end = self.gate = -1
        passed: list[int] = []
        try:
            self.read_end, write_end = os.pipe()
            passed.append(write_end)
            child["P2PRC_EVENTS_FD"] = str(write_end)
            child["P2PRC_GATE_FD"] = ""
            if gated:
                gate_read, self.gate = os.pipe()
                passed.append(gate_read)
                child["P2PRC_GATE_FD"] = str(gate_read)
            with open(self.artifacts / "stdout", "wb") as output:
                # A session of its own: a Ctrl-C at p2prc's terminal is p2prc's to pass on
                # (``_stop``), once, and a kill of p2prc's group leaves it to see its pipe
                # broken and end.
                self.proc = subprocess.Popen(argv, cwd=project, stdin=subprocess.DEVNULL,
                                             stdout=output, stderr=subprocess.STDOUT,
                                             pass_fds=passed, env=child,
                                             start_new_session=True)
        except BaseException:
            self._close()
            raise
        finally:
            for fd in passed:
                os.close(fd)

    def go(self) -> None:
        """Let a gated play begin."""
        if self.gate >= 0:
            try:
                os.write(self.gate, b"go\n")
            except BrokenPipeError:  # it ended already: wait() says how
                pass
            os.close(self.gate)
            self.gate = -1

    def wait(self) -> PlaybookEnd:
        """Hand on its results until it ends (an exception, a Ctrl-C, stops it: SIGINT, then
        a kill after ``_STOP_SECONDS``, and the exception goes on)."""
        try:
            self.go()
            stats = self.events.read(self.read_end, self.proc)
            rc = self.proc.wait()
        except BaseException:
            _stop(self.proc, self.read_end)
            raise
        finally:
            self._close()
            if self.proc.returncode is not None:
                (self.artifacts / "rc").write_text(str(self.proc.returncode))
        return PlaybookEnd(rc, stats, self.artifacts / "stdout",
                           _last_line(self.artifacts / "stdout"))

    def cancel(self) -> None:
        """End it; gated and not let go, it has logged in nowhere (and has no workers)."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        finally:
            self._close()

    def _close(self) -> None:
        for name in ("read_end", "gate"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def play(project: Path, playbook: str, inventory: Mapping[str, Any], extravars: Mapping[str, Any],
         run_dir: Path, on_event: Callable[[dict[str, Any]], None], **options: Any
         ) -> PlaybookEnd:
    """Run ``playbook`` of the bundle in ``project`` on ``inventory`` (see ``Playbook``)."""
    return Playbook(project, playbook, inventory, extravars, run_dir, on_event,
                    **options).wait()


class _Events:
    """The callback's lines, each checked, kept as a job event file and handed on; the
    recap's counts kept apart."""

    def __init__(self, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.folder = folder
        self.on_event = on_event
        self.count = 0
        self.stats: dict[str, dict[str, int]] = {}

    def read(self, fd: int, proc: subprocess.Popen[bytes]) -> dict[str, dict[str, int]]:
        """Until every writer of the pipe is gone, or Ansible ended and none of what is left
        (an SSH master it started, say) writes."""
        pending = bytearray()
        dropping = False
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if not selector.select(timeout=0.5):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    if not dropping:
                        self.line(bytes(pending[:end]))
                    dropping = False
                    del pending[:end + 1]
                if len(pending) > _MAX_LINE:
                    pending.clear()
                    dropping = True
        return self.stats

    def line(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("event"), str) \
                or not _EVENT.fullmatch(event["event"]):
            return
        self.count += 1
        (self.folder / f"{self.count}-{event['event']}.json").write_bytes(raw + b"\n")
        data = event.get("event_data")
        if event["event"] == "playbook_on_stats":
            self.stats = _stats(data)
        elif isinstance(data, dict):
            self.on_event(event)


def _stats(data: Any) -> dict[str, dict[str, int]]:
    """The recap's counts, each a host name and a whole number; anything else is left out."""
    if not isinstance(data, dict):
        return {}
    found: dict[str, dict[str, int]] = {}
    for name in _STATS:
        counts = data.get(name)
        if isinstance(counts, dict):
            found[name] = {host: count for host, count in counts.items()
                           if isinstance(host, str) and isinstance(count, int)
                           and not isinstance(count, bool)}
    return found


def _stop(proc: subprocess.Popen[bytes], events: int) -> None:
    """End Ansible: SIGINT, as a Ctrl-C at its terminal (it ends its play), then SIGTERM (its
    workers, each in a session of its own, get it from it), then SIGKILL; meanwhile what it
    still says is read and dropped, so a full pipe holds nothing up. A second Ctrl-C goes
    straight to the kill."""
    try:
        for signal_number, seconds in ((signal.SIGINT, _STOP_SECONDS), (signal.SIGTERM, 2.0)):
            if proc.poll() is not None:
                return
            proc.send_signal(signal_number)
            _drain_until_ended(proc, events, seconds)
    except BaseException:  # noqa: BLE001 - a second Ctrl-C: the first one goes on
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _drain_until_ended(proc: subprocess.Popen[bytes], fd: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        if fd >= 0:
            selector.register(fd, selectors.EVENT_READ)
        while proc.poll() is None and (left := deadline - time.monotonic()) > 0:
            if not selector.get_map():
                time.sleep(min(left, 0.05))
            elif selector.select(min(left, 0.1)) and not os.read(fd, 1 << 16):
                selector.unregister(fd)  # every writer gone: only the exit is left


def _private(path: Path, text: str) -> Path:
    """``text`` in a file only this user reads (the run's variables may hold secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return path


def _joined(first: str, rest: str | None, separator: str) -> str:
    return first + separator + rest if rest else first


def _last_line(path: Path) -> str:
    """Why Ansible stopped, safe to show: the last error line of its output, else its last
    line that says something."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, path.stat().st_size - 4096))
            tail = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR!", "[ERROR]"))]
    return clean((errors or lines or [""])[-1], 300)
