"""Fault points: named places where a test makes this process die or stall, to prove that
nothing is lost or leaked when that happens for real (a power cut, the kernel's OOM killer, a
laptop closed mid-command). etcd's gofail and FoundationDB's buggify do the same.

``P2PRC_FAULTS`` names them, comma-separated, each ``POINT=ACTION``:

- ``kill``: SIGKILL this process (a server's worker; the gunicorn master starts another);
- ``kill-server``: SIGKILL this process's parent first when it is the server's master, then
  this one (the whole server dies at once, as at a power cut);
- ``sleep:SECONDS``: wait there (a slow engine), then go on.

Unset (always, outside tests), ``point`` costs one dictionary look-up. The points are listed
in ``POINTS``; a name not listed there is refused at start, so a test cannot aim at nothing.
"""

from __future__ import annotations

import os
import signal
import time

from p2prc_core.errors import P2PRCError

ENV = "P2PRC_FAULTS"
POINTS = {
    # a container create on the host (ContainerService._start, the Docker backend)
    "create.reserved": "ports, GPUs and the caller's place are held; nothing started",
    "create.created": "the engine has created the container; it has not started",
    "create.started": "the container runs; its host key is not read yet",
    "create.settled": "its lease is written; the caller has no answer yet",
}


class FaultSpecError(P2PRCError, ValueError):
    """``P2PRC_FAULTS`` names a point or an action that does not exist."""


def parse(text: str) -> dict[str, str]:
    """``P2PRC_FAULTS``'s text as {point: action}.

    :raises FaultSpecError: an unknown point or action (named in the message).
    """
    found: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, action = part.partition("=")
        if name not in POINTS:
            raise FaultSpecError(f"{ENV}: no fault point {name!r}; there are "
                                 f"{', '.join(sorted(POINTS))}")
        if action not in ("kill", "kill-server") and _seconds(action) is None:
            raise FaultSpecError(f"{ENV}: {part!r}: the action is kill, kill-server or "
                                 f"sleep:SECONDS")
        found[name] = action
    return found


def _seconds(action: str) -> float | None:
    kind, _, value = action.partition(":")
    try:
        return float(value) if kind == "sleep" and 0 <= float(value) <= 3600 else None
    except ValueError:
        return None


_ACTIVE = parse(os.environ.get(ENV, ""))


def point(name: str) -> None:
    """Do what ``P2PRC_FAULTS`` says for ``name`` (usually nothing)."""
    action = _ACTIVE.get(name)
    if action is None:
        return
    if action.startswith("sleep:"):
        time.sleep(_seconds(action) or 0)
        return
    if action == "kill-server" and _parent_is_server():
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _parent_is_server() -> bool:
    """This process's parent is a p2prc server's master (a worker's parent), not a shell."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return False
    return any(w.endswith(b"p2prc") for w in words[:2]) and b"server" in words
