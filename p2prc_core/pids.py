"""Whether a process that wrote a record is still running: its id, and when it started (so
that another process given the same id later is not taken for it). Ids come from files on
disk, so any value is checked before use."""

from __future__ import annotations

import os

MAX_PID = 1 << 22  # Linux's highest (pid_max); anything else is not a process id


def started(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot: /proc/PID/stat's 22nd field);
    0 where it cannot be read."""
    return _stat(pid)[1]


def _stat(pid: int) -> tuple[str, int]:
    """Process ``pid``'s state letter (``Z``: ended, not yet reaped) and start time; ("", 0)
    where they cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return "", 0


def alive(pid: object, since: object = 0) -> bool:
    """Whether ``pid`` names a running process (that started at ``since``, where given and
    readable): a process that ended but was not reaped yet (a zombie) is not. A value that
    is not a process id, or one of another user's processes, counts as alive: a record is
    only ever taken as dead on proof."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < MAX_PID:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    state, start = _stat(pid)
    if state == "Z":
        return False
    if isinstance(since, int) and not isinstance(since, bool) and since > 0 and start:
        return start == since
    return True
