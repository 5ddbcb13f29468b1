"""The plugins' entry points, found without ``importlib.metadata`` when nothing was installed
or removed since they were last found.

``importlib.metadata`` reads every installed distribution's metadata to find one group:
with its own imports, tens of milliseconds that every command paid before it did anything
(issue 27). What it found is kept in the node's home (``entry-points.json``) with a key made
of what it read: each folder on ``sys.path``, and the name, size and change time of each
distribution's metadata folder and its ``entry_points.txt`` there. Installing, upgrading or
removing a distribution changes that key, and the next start looks again. The file is the
home owner's own; whatever it holds that is not a list of four strings per entry point is
ignored, and the entry points are found again.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FILE = "entry-points.json"
_METADATA = (".dist-info", ".egg-info", ".egg")  # (an .egg folder has EGG-INFO inside)


@dataclass(frozen=True)
class EntryPoint:
    """One entry point of a group: ``value`` is ``module`` or ``module:attribute``."""

    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        found: Any = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            found = getattr(found, part)
        return found


def entry_points(group: str, home: Path | None = None) -> list[EntryPoint]:
    """The entry points of ``group``, as ``importlib.metadata`` finds them; kept in
    ``home`` (when given) for the next start while nothing installed changes."""
    key = installed_key()
    path = home / CACHE_FILE if home is not None else None
    if path is not None:
        kept = _read(path, key, group)
        if kept is not None:
            return kept
    found = _scan(group)
    if path is not None:
        _write(path, key, group, found)
    return found


def installed_key() -> str:
    """What ``importlib.metadata`` would read, in one string: each folder on ``sys.path``,
    and the size and change time of each distribution's metadata folder and entry points
    file in it (of a zip file on the path, the file's own)."""
    parts: list[str] = []
    for folder in sys.path:
        parts.append(f"\0{folder}")
        try:
            names = sorted(e.name for e in os.scandir(folder or ".")
                           if e.name.lower().endswith(_METADATA))
        except OSError:  # not a folder: a zip file on the path (or a folder in one), or
            parts.append(_file_key(folder))  # nothing
            continue
        for name in names:
            inside = "EGG-INFO" if name.lower().endswith(".egg") else ""
            for item in (name, os.path.join(name, inside, "entry_points.txt")):
                try:
                    st = os.stat(os.path.join(folder or ".", item))
                except OSError:
                    continue
                parts.append(f"{item}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def installed_version(name: str) -> str | None:
    """The version of distribution ``name`` installed on ``sys.path`` (None: none is), read
    from its metadata folder's name (``name-version.dist-info``, as wheels install it);
    ``importlib.metadata`` is asked only where no such folder names it."""
    wanted = re.sub(r"[-_.]+", "_", name).lower()
    for folder in sys.path:
        try:
            names = [e.name for e in os.scandir(folder or ".")
                     if e.name.lower().endswith(_METADATA)]
        except OSError:
            continue
        for entry in names:
            dist, _, rest = entry.rpartition(".")[0].partition("-")
            version = rest.split("-")[0]
            if re.sub(r"[-_.]+", "_", dist).lower() == wanted and version:
                return version
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_key(path: str) -> str:
    """The size and change time of ``path``, or of the nearest existing folder or file
    above it (a folder inside a zip file: the zip's)."""
    while path:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            return f"{path}:{st.st_size}:{st.st_mtime_ns}"
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return ""


def _scan(group: str) -> list[EntryPoint]:
    import importlib.metadata

    found = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist.metadata["Name"] if ep.dist else "unknown distribution"
        version = ep.dist.version if ep.dist else "?"
        found.append(EntryPoint(ep.name, ep.value, str(dist), str(version)))
    return found


def _read(path: Path, key: str, group: str) -> list[EntryPoint] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    rows = data.get("groups", {}).get(group) if isinstance(data.get("groups"), dict) else None
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r)
            for r in rows):
        return None
    return [EntryPoint(*row) for row in rows]


def _write(path: Path, key: str, group: str, found: list[EntryPoint]) -> None:
    """Kept whole or not at all (a new file, then renamed); a home that cannot be written
    to (full, read-only) only means the next start looks again."""
    rows = [[ep.name, ep.value, ep.distribution, ep.version] for ep in found]
    new = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        try:
            new.write_text(json.dumps({"key": key, "groups": {group: rows}}))
            os.replace(new, path)
        finally:
            new.unlink(missing_ok=True)
