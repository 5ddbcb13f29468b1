"""Files in a node's home: atomic writes and locks, so a crash or a rival writer loses nothing."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from p2prc_core.errors import P2PRCError

T = TypeVar("T")


class CorruptFile(P2PRCError, ValueError):
    """A state file that cannot be read; the message names it and what to do."""


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    Temp file in the same directory, fsync, rename, fsync of the directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json_file(path: Path, default: Any) -> Any:
    """The parsed file, or ``default`` when it does not exist.

    :raises ValueError: the file exists but is not JSON (named in the message).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except ValueError as err:
        raise CorruptFile(f"{path} is not valid JSON ({err}); move it aside to start afresh") \
            from None


def update_json(path: Path, change: Callable[[dict[str, Any]], T]) -> T:
    """Read-modify-write a JSON object file under its lock; written (atomically) only when
    ``change`` altered it. A file that holds something other than an object reads as {}."""
    with locked(path):
        data = read_json_file(path, {})
        if not isinstance(data, dict):
            data = {}
        before = json.dumps(data, sort_keys=True)
        result = change(data)
        if not path.exists() or json.dumps(data, sort_keys=True) != before:
            atomic_write_json(path, data)
        return result


def read_json_object(path: Path) -> dict[str, Any]:
    """The file's JSON object; {} when it is missing or holds something else."""
    data = read_json_file(path, {})
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``.lock (across processes) for a read-modify-write."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


SERVER_DB = "server.db"  # the server's shared state: leases, ports, nonces, invites, intake
_SHARED: weakref.WeakSet[SharedDB] = weakref.WeakSet()


def close_shared_dbs() -> None:
    """Close this thread's connection of every ``SharedDB`` of this process: the server's
    master does before gunicorn forks its workers, which open their own (an open SQLite
    connection must not be carried across a fork, and each worker would hold its copy of
    the descriptors for its whole life)."""
    for shared in list(_SHARED):
        shared.close()


class SharedDB:
    """A SQLite file in the home that every process and thread of a node shares safely:
    one connection per thread, WAL, and a wait instead of an error when it is busy."""

    def __init__(self, path: Path, schema: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self.db().executescript(schema)
        os.chmod(path, 0o600)
        _SHARED.add(self)

    def close(self) -> None:
        """Close this thread's connection (the next ``db`` opens another)."""
        db, self._local.db = getattr(self._local, "db", None), None
        if db is not None:
            db.close()

    def db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # A small page cache: server.db is small and the system caches its file; the
            # default (2 MB a connection, one connection per thread and table owner) made
            # each worker grow by megabytes over hours, as the soak showed.
            db.execute("PRAGMA cache_size=-256")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time across processes."""
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
