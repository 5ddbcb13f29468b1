"""A command run in a running container through the engine's exec API, its standard
streams on one raw socket (what an exec stream carries to the caller, ``server.exec_stream``).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from p2prc_core.containers import ContainerError

_REAPED_WITHIN = 5.0  # seconds the engine may take to note the exit after the streams end


@dataclass
class Attached:
    """A command started in a container: its streams (Docker's multiplexed frames out; what
    is written in is its stdin; a shutdown for writing closes that), and its exit code."""

    sock: socket.socket
    client: Any
    exec_id: str
    keep: Any  # the SDK's own wrapper of ``sock``: closed with it, not before

    def exit_code(self) -> int | None:
        """The command's exit code, once its streams have ended (None: the engine did not
        say in time)."""
        deadline = time.monotonic() + _REAPED_WITHIN
        while True:
            try:
                state = self.client.api.exec_inspect(self.exec_id)
            except Exception:  # noqa: BLE001 - the engine went away: no code to tell
                return None
            if not state.get("Running") and isinstance(state.get("ExitCode"), int):
                return int(state["ExitCode"]) & 0xFF
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def close(self) -> None:
        for each in (self.sock, self.keep):
            try:
                each.close()
            except OSError:
                pass


def attach(client: Any, container_id: str, argv: list[str], stdin: bool,
           env: dict[str, str] | None = None) -> Attached:
    """Start ``argv`` in the container (root, its environment with ``env`` over it, no
    terminal).

    :raises ContainerError: 409 the container does not run; 502 the engine refused.
    """
    import docker

    try:
        created = client.api.exec_create(container_id, argv, stdin=stdin, stdout=True,
                                          stderr=True, tty=False, environment=env or None)
        started = client.api.exec_start(created["Id"], socket=True)
    except docker.errors.NotFound:
        raise ContainerError(409, "Container not running",
                             f"Container {container_id[:12]} is gone from the engine.") from None
    except docker.errors.APIError as err:
        if err.status_code == 409:
            raise ContainerError(409, "Container not running",
                                 f"Container {container_id[:12]} is not running.") from None
        raise ContainerError(502, "Engine refused",
                             f"Docker could not run the command: {err.explanation}") from None
    raw = getattr(started, "_sock", started)
    return Attached(raw, client, created["Id"], started)
