"""The lines a job runs in its container's shell (``sh -c``), the same over SSH
(``exec_job.JobShell``) and over exec streams (``stream_shell.StreamShell``): the command
under its timeout with its pid and exit code in per-job files, a detached start, its logs,
its state, an output's archive. Every word from the user is quoted, never templated."""

from __future__ import annotations

import os
import shlex
import subprocess

from p2prc_core.errors import P2PRCError
from p2prc_core.text import clean

MISSING = 3  # what the fetch line exits with when the output is not there


def job_file(job_id: str, kind: str) -> str:
    """One of a job's files in its container (``pid``, ``out``, ``err``, ``exit``), named by
    the job, so that two jobs on one container (``--on CONTAINER``) never share one."""
    return shlex.quote(f"/run/p2prc-job-{job_id}.{kind}")


def command_script(command: list[str], env: dict[str, str], workdir: str,
                   timeout: int, job_id: str) -> str:
    """The remote shell line that runs ``command`` (quoted, never templated): in WORKDIR,
    with ENV, under ``timeout``, the pid of the shell that waits for it in the job's ``pid``
    file, its exit code in its ``exit`` file when it ends (read back when ssh exits 255,
    which a command may, and when a lost job is got later). sshd, and the engine's exec
    alike, start that shell in a session of its own (as setsid would), so the command is
    in its process group, which Ctrl-C reaches (``interrupt_script``). The shell outlives a SIGINT
    (trapped, and so default again in the command) to turn the command's death by a signal
    into an exit code (130), which ssh passes on, where sshd's own report of a signal would
    make ssh exit 255, the code of a lost connection. ``timeout --foreground`` stays in
    that process group (else it makes one of its own, out of Ctrl-C's reach) and leaves a
    terminal to the command."""
    run = ["timeout", "--foreground", "--signal=INT", "--kill-after=10s"]
    run += [f"{timeout}s", "env", "--", *(f"{k}={v}" for k, v in env.items()), *command]
    pid, done = job_file(job_id, "pid"), job_file(job_id, "exit")
    keep = f"c=$?; echo $c > {done}.new && mv {done}.new {done}; exit $c"
    inner = f"echo $$ > {pid}; trap {shlex.quote(keep)} EXIT; trap : INT; {shlex.join(run)}"
    folder = shlex.quote(workdir)
    return f"mkdir -p {folder} && cd {folder} && exec sh -c {shlex.quote(inner)}"


def detached_script(command: list[str], env: dict[str, str], workdir: str,
                    timeout: int, job_id: str) -> str:
    """The remote line that starts ``command`` in the background and returns at once: its
    output to the job's ``out`` and ``err`` files, its exit code to ``exit`` when it ends."""
    # --foreground: timeout stays in the job's process group, which an interrupt signals.
    run = ["timeout", "--foreground", "--signal=INT", "--kill-after=10s", f"{timeout}s",
           "env", "--", *(f"{k}={v}" for k, v in env.items()), *command]
    pid, out, err, done = (job_file(job_id, kind) for kind in ("pid", "out", "err", "exit"))
    inner = (f"echo $$ > {pid}; {shlex.join(run)} >{out} 2>{err}; "
             f"echo $? > {done}.new && mv {done}.new {done}")
    folder = shlex.quote(workdir)
    # Only the start goes to the background (braces): a backgrounded '&&' list would hold
    # the SSH channel open, under bash, until the command ends.
    return (f"mkdir -p {folder} && cd {folder} && rm -f {done} && {{ setsid nohup sh -c "
            f"{shlex.quote(inner)} </dev/null >/dev/null 2>&1 & }}")


def logs_script(follow: bool, job_id: str, last_bytes: int | None = None) -> str:
    """The remote line that prints a detached job's output (stderr to stderr), and with
    ``follow`` keeps printing until the job ends. ``last_bytes``: only the end of each (a
    page that shows a log reads no more than it shows)."""
    pid, out, err = (job_file(job_id, kind) for kind in ("pid", "out", "err"))
    if not follow:
        read = "cat" if last_bytes is None else f"tail -c {int(last_bytes)}"
        return f"{read} {out} 2>/dev/null; {read} {err} >&2 2>/dev/null; true"
    return (f"p=$(cat {pid}); tail -n +1 -f --pid=$p {err} >&2 & "
            f"tail -n +1 -f --pid=$p {out}; wait")


def exit_code_of(text: str) -> int | None:
    """An exit code as the container wrote it (0 to 255), or None."""
    return int(text) if text.isdigit() and len(text) <= 3 and int(text) <= 255 else None


def fetch_script(remote: str) -> tuple[str, str]:
    """The line that writes a tar of ``remote`` (its own name only) to stdout, exiting
    ``MISSING`` when it is not there; and that name."""
    folder, name = os.path.split(remote.rstrip("/") or "/")
    return (f"cd {shlex.quote(folder or '/')} && {{ test -e {shlex.quote(name)} || "
            f"test -L {shlex.quote(name)} || exit {MISSING}; }} && "
            f"exec tar -c -f - -- {shlex.quote(name)}"), name


def state_script(job_id: str) -> str:
    """The line that prints the command's exit code, ``running``, or ``gone``."""
    pid, done = job_file(job_id, "pid"), job_file(job_id, "exit")
    return (f'if [ -f {done} ]; then cat {done}; elif kill -0 "$(cat {pid} 2>/dev/null)" '
            f'2>/dev/null; then echo running; else echo gone; fi')


def state_from(answer: subprocess.CompletedProcess[bytes]) -> int | str:
    """What ``state_script`` printed, read (``state_of``).

    :raises P2PRCError: the container did not answer (its words)."""
    if answer.returncode != 0:
        said = clean(answer.stderr.decode(errors="replace").strip()[-300:], 300)
        raise P2PRCError(f"no answer from the container ({said or answer.returncode})")
    return state_of(answer.stdout.decode(errors="replace").strip())


def state_of(text: str) -> int | str:
    code = exit_code_of(text)
    return code if code is not None else "running" if text == "running" else "gone"


def interrupt_script(job_id: str, force: bool) -> str:
    """SIGINT (SIGKILL when ``force``) to the command's process group."""
    sig, pid = "KILL" if force else "INT", job_file(job_id, "pid")
    # -s SIG: dash (sh on Debian) reads "kill -INT -- -PID" as a bad number
    return f"kill -s {sig} -- -$(cat {pid}) 2>/dev/null || kill -s {sig} $(cat {pid})"


def upload_script(workdir: str, inputs: bool) -> str:
    remote = f"mkdir -p {shlex.quote(workdir)}"
    return remote + " && tar -x --no-same-owner -C / -f -" if inputs else remote
