"""The dashboard's Jobs page: what ``p2prc exec`` ran (as ``p2prc jobs ls`` lists it), one
job's log (read from its container while a detached job runs, as ``p2prc jobs logs`` does;
Kill keeps the last of it in the job's folder, shown once the container is gone), its
outputs, and Kill. As every page of the dashboard, a GET writes nothing.

Whatever a job record or a peer's output holds is text: Jinja escapes it.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import falcon

from p2prc_core.errors import P2PRCError
from p2prc_core.exec_job import Executor, JobRun, logs_script
from p2prc_core.jobs import Job, JobStore
from p2prc_core.text import clean
from p2prc_ui.files import send_inside

if TYPE_CHECKING:
    from p2prc_ui.app import Dashboard

LOGS = {"out": "stdout.log", "err": "stderr.log"}  # in the job's folder
MAX_LOG = 256 << 10  # bytes of each stream shown (the end of it)
REFRESH = 5  # seconds between reloads of a job that runs
RUNNING = ("starting", "running")  # a 'p2prc exec' in a terminal runs it
_JOB_ID = re.compile(r"[0-9a-f]{8}")


class JobsPage:
    """``/jobs``, ``/jobs/JOB``, its output files and its Kill button."""

    def __init__(self, board: Dashboard):
        self.board = board

    @property
    def store(self) -> JobStore:
        return JobStore(self.board.services.home)

    def executor(self, said: list[str]) -> Executor:
        """The node's job runner; its lines for people are kept in ``said``."""
        return Executor(self.board.services.on_peers, self.store, said.append)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        jobs = list(reversed(self.store.all()))[:200]
        self.board.render(resp, "jobs.html", "jobs", jobs=jobs,
                          note=self.board.take_note(req))

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        job = self._job(job_id)
        log: dict[str, Any] = {"out": "", "err": "", "error": None, "remote": False,
                               "finished": None}
        if job.state == "detached":
            log.update(self._read_remote(job))
        else:
            log.update(read_saved(self.store, job))
        runs = job.state in RUNNING or (job.state == "detached" and log["finished"] is None
                                        and not log["error"])
        self.board.render(resp, "job.html", "jobs", job=job, log=log, running=runs,
                          refresh=REFRESH if runs else None, files=self._files(job),
                          note=self.board.take_note(req))

    def on_get_file(self, req: falcon.Request, resp: falcon.Response, job_id: str,
                    name: str) -> None:
        send_inside(resp, out_dir(self._job(job_id)), name,
                    f"No file {name} in job {job_id}'s outputs.")

    def on_post_kill(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        """Ctrl-C to a job that runs, asked first; a detached one's container is then
        removed (its log and outputs brought back first), as Ctrl-C does for ``exec``."""
        job = self._job(job_id)
        back = f"/jobs/{job.id}"
        if str(req.context.form.get("confirmed", "")).strip() != "1":
            self.board.render(resp, "confirm.html", "jobs", action=f"{back}/kill",
                              item=job.id, question=f"Kill job {job.id}?",
                              detail=f"{job.command_text} on {job.peer_name} gets Ctrl-C; its "
                                     f"outputs come back and its container is removed.",
                              button="Kill", back=back)
            return
        said: list[str] = []
        try:
            text = kill_job(self.executor(said), job)
        except P2PRCError as err:
            self._back(back, "error", f"Could not kill job {job.id}: {err}")
        self._back(back, "ok", " ".join([text, *said]))

    def _back(self, path: str, kind: str, text: str) -> NoReturn:
        raise falcon.HTTPSeeOther(f"{path}?note={self.board.note(kind, clean(text, 2000))}")

    def _job(self, job_id: str) -> Job:
        """The job of this exact id (no prefixes, no ``last``: an address names one)."""
        try:
            job = self.store.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        except P2PRCError:
            job = None
        if job is None or job.id != job_id:
            raise falcon.HTTPNotFound(description=f"No job {job_id} ('p2prc jobs ls' lists "
                                                  f"them).")
        return job

    def _read_remote(self, job: Job) -> dict[str, Any]:
        """A detached job's log as it is now, and its exit code once it ended (nothing is
        written: a page changes nothing). A container that does not answer is said, with
        what Kill kept before."""
        try:
            return read_remote(self.executor([]), job)
        except P2PRCError as err:
            return {**read_saved(self.store, job), "error": str(err)}

    def _files(self, job: Job) -> list[dict[str, Any]]:
        root = out_dir(job)
        if root is None:
            return []
        files = []
        for path in sorted(itertools.islice(root.rglob("*"), 2000))[:500]:
            if path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(root):
                files.append({"path": str(path.relative_to(root)), "size": path.stat().st_size})
        return files


def out_dir(job: Job) -> Path | None:
    """Where the job's outputs land, resolved, where it is a folder."""
    if not isinstance(job.out_dir, str) or not job.out_dir:
        return None
    root = Path(job.out_dir).resolve()
    return root if root.is_dir() else None


def read_remote(executor: Executor, job: Job) -> dict[str, Any]:
    """What a detached job printed so far (``jobs logs`` without ``-f``) and its exit code
    (None while it runs), read over its connection.

    :raises P2PRCError: its container is gone or does not answer.
    """
    run = executor.reopen(job)
    try:
        done = run.shell.quick(logs_script(False, job.id, MAX_LOG))
        finished = run.shell.exit_code()
    finally:
        run.shell.close()
    return {"out": _tail(done.stdout), "err": _tail(done.stderr), "remote": True,
            "finished": finished}


def kill_job(executor: Executor, job: Job) -> str:
    """Ctrl-C to a job that runs. One a ``p2prc exec`` runs in a terminal: that exec brings
    its outputs back and removes its container (its connection is left open). A detached
    one: after INT (KILL when it is still there after a few seconds), its log is kept and
    its outputs fetched, then its container removed (unless kept), as ``exec`` does on
    Ctrl-C. Returns what was done.

    :raises P2PRCError: it does not run, or its container is gone or does not answer.
    """
    if job.state in RUNNING:
        executor.reopen(job).shell.interrupt(force=False)
        return (f"Sent Ctrl-C to job {job.id}: the 'p2prc exec' that runs it brings its "
                f"outputs back and removes its container.")
    if job.state != "detached":
        raise P2PRCError(f"it is {job.state}, not running")
    run = executor.reopen(job)
    try:
        code = run.shell.exit_code()
        if code is None:
            code = _interrupt(run)
        done = run.shell.quick(logs_script(False, job.id, MAX_LOG))
        save_log(executor.store, job, _tail(done.stdout), _tail(done.stderr))
        job.exit_code, job.ended = code, time.time()
        job.state = "interrupted" if code in (None, 130, 137) else \
            "done" if code == 0 else "failed"
        executor.fetch_outputs(run)
    finally:
        run.shell.close()
    executor.release(run)
    executor.store.save(job)
    return f"Killed job {job.id} on {job.peer_name}" + (
        "; its container is kept." if job.keep else "; its container is removed.")


def _interrupt(run: JobRun, wait: float = 5) -> int | None:
    """SIGINT to a detached command, then SIGKILL if it has not ended in ``wait`` seconds;
    its exit code where it wrote one."""
    run.shell.interrupt(force=False)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        code = run.shell.exit_code()
        if code is not None:
            return code
        time.sleep(0.5)
    run.shell.interrupt(force=True)
    return run.shell.exit_code()


def save_log(store: JobStore, job: Job, out: str, err: str) -> None:
    """Keep what was read of a job's log in its folder (it goes with ``jobs rm``)."""
    folder = store.root / job.id
    for stream, text in (("out", out), ("err", err)):
        (folder / LOGS[stream]).write_text(text, encoding="utf-8")


def read_saved(store: JobStore, job: Job) -> dict[str, Any]:
    """What was kept of a job's log here ("" for a stream never kept)."""
    found: dict[str, Any] = {}
    for stream, name in LOGS.items():
        path = store.root / job.id / name
        try:
            with path.open("rb") as f:
                size = path.stat().st_size
                f.seek(max(0, size - MAX_LOG))
                found[stream] = _tail(f.read())
        except OSError:
            found[stream] = ""
    return found


def _tail(data: bytes) -> str:
    """The last MAX_LOG bytes of a stream, as text."""
    return data[-MAX_LOG:].decode(errors="replace")
