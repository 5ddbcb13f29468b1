"""Jobs: each ``p2prc exec`` on one container, kept in the home as runs are
(``$P2PRC_HOME/jobs/JOB/job.json``), so that ``p2prc jobs`` can list them, follow a detached
one's output, and fetch its outputs later."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from p2prc_core import pids
from p2prc_core.errors import P2PRCError
from p2prc_core.storage import atomic_write_json, read_json_file

STATES = ("starting", "running", "done", "failed", "interrupted", "lost", "detached")
FINISHED = ("done", "failed", "interrupted")  # the container is gone or given back
_JOB_ID = re.compile(r"[0-9a-f]{8}")


@dataclass
class Job:
    """One command on one container, as ``jobs show`` shows it."""

    id: str
    peer_id: str  # the node that runs it
    peer_name: str  # what it was called when the job started
    container_id: str
    command: list[str]
    workdir: str = "/job"
    state: str = "starting"
    exit_code: int | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    outputs: list[dict[str, str]] = field(default_factory=list)  # [{"remote", "local"}]
    out_dir: str = ""  # where outputs land by default
    batch: str = ""  # the first job's id, for a command run on several containers at once
    keep: bool = False  # the container stays when the job ends (started by exec or not)
    message: str = ""  # why it is lost, or what went wrong with its outputs
    pid: int = field(default_factory=os.getpid)  # the p2prc process that runs it (0: unknown)
    pid_started: int = field(default_factory=lambda: pids.started(os.getpid()))

    @property
    def duration(self) -> float:
        return (self.ended or time.time()) - self.started

    @property
    def command_text(self) -> str:
        import shlex

        return shlex.join(self.command)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration": round(self.duration, 3)}

    @classmethod
    def from_json(cls, data: Any) -> Job | None:
        """What ``as_dict`` wrote; None for a damaged record (it is not listed): a field
        missing or of the wrong type, an unknown state, an id that is not one."""
        if not isinstance(data, dict):
            return None
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if any(not _FIELD_CHECKS[name](value) for name, value in values.items()):
            return None
        try:
            job = cls(**values)
        except TypeError:  # a field without a default is missing
            return None
        if not _JOB_ID.fullmatch(job.id) or job.state not in STATES:
            return None
        return job


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_code(value: Any) -> bool:
    return value is None or isinstance(value, int) and not isinstance(value, bool)


def _is_output(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("remote"), str) and \
        isinstance(value.get("local"), str)


_FIELD_CHECKS: dict[str, Any] = {
    "id": _is_text, "peer_id": _is_text, "peer_name": _is_text, "container_id": _is_text,
    "command": lambda v: isinstance(v, list) and all(isinstance(w, str) for w in v),
    "workdir": _is_text, "state": _is_text, "exit_code": _is_code, "started": _is_number,
    "ended": lambda v: v is None or _is_number(v),
    "outputs": lambda v: isinstance(v, list) and all(_is_output(o) for o in v),
    "out_dir": _is_text, "batch": _is_text, "keep": lambda v: isinstance(v, bool),
    "message": _is_text, "pid": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "pid_started": lambda v: isinstance(v, int) and not isinstance(v, bool),
}  # what each field of a record read from disk must be


class JobStore:
    """Each job's record: ``$P2PRC_HOME/jobs/JOB/job.json``, written atomically."""

    def __init__(self, home: Path):
        self.root = home / "jobs"
        self.damaged: list[str] = []  # the folders of records ``all`` left out, last time

    def new_id(self) -> str:
        """A short id no job here has yet (its folder is made, so two callers never share
        one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            job_id = secrets.token_hex(4)
            try:
                (self.root / job_id).mkdir()
                return job_id
            except FileExistsError:
                continue

    def save(self, job: Job) -> None:
        atomic_write_json(self.root / job.id / "job.json", job.as_dict())

    def all(self) -> list[Job]:
        """Every job, oldest first; damaged records are left out (named in ``damaged``),
        and so is one whose folder is not named by its id."""
        self.damaged = []
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            record = path / "job.json"
            if not record.exists():
                continue  # a job being made (its id is taken first), or not a job's folder
            try:
                job = Job.from_json(read_json_file(record, None))
            except (P2PRCError, OSError, ValueError):
                job = None
            if job is None or job.id != path.name:
                self.damaged.append(path.name)
                continue
            found.append(_as_lost(job) if _runner_died(job) else job)
        return sorted(found, key=lambda j: j.started)

    def get(self, text: str) -> Job:
        """A job by id, a unique start of one, or ``last``.

        :raises P2PRCError: none or several match.
        """
        every = self.all()
        if text == "last" and every:
            return every[-1]
        matches = [j for j in every if j.id.startswith(text)] if text else []
        if len(matches) != 1:
            raise P2PRCError(f"no job {text!r} ('p2prc jobs ls' lists them)" if not matches
                             else f"{text!r} matches {len(matches)} jobs: give more of it")
        return matches[0]

    def remove(self, job: Job) -> None:
        """Forget a job (its outputs, wherever they went, stay)."""
        shutil.rmtree(self.root / job.id, ignore_errors=True)


def _runner_died(job: Job) -> bool:
    """A job still starting or running whose p2prc process is gone (killed: it never
    recorded the end)."""
    return job.state in ("starting", "running") and job.pid > 0 and \
        not pids.alive(job.pid, job.pid_started)


def _as_lost(job: Job) -> Job:
    from dataclasses import replace

    return replace(job, state="lost", message=(
        "the p2prc process that ran it ended before the job did (killed?); the command may "
        f"still run: 'p2prc jobs get {job.id}' fetches its outputs once it ends"))

