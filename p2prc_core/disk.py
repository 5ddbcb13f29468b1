"""A full disk, told apart from other failures: where the home's disk fills up, every command
and the server say so in one line (never a traceback), and leave their files as they were
(``storage.atomic_write``: the old file or the new, never half of one)."""

from __future__ import annotations

import errno

FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that found no space (a file's, or SQLite's)."""
    if isinstance(err, OSError):
        return err.errno in FULL
    # sqlite3's OperationalError, told by its words (sqlite3 is not imported for this).
    return type(err).__module__ == "sqlite3" and "disk is full" in str(err)


def full_message(err: BaseException, where: str) -> str:
    """One line for a full disk under ``where`` (the home), with what to do."""
    name = getattr(err, "filename", None)
    what = f" writing {name}" if isinstance(name, str) else ""
    return (f"the disk that holds {where} is full (no space left{what}): free some space and "
            f"run it again; the files there are as they were before")
