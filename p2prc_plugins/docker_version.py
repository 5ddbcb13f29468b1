"""The Docker engine's version, asked over its Unix socket in one plain HTTP request: the
Docker SDK (about 0.1 s to import) is not loaded for ``p2prc version``. An engine elsewhere
(``DOCKER_HOST=tcp://...``, TLS) is asked through the SDK as before."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

MAX_ANSWER = 1 << 20  # /version is about 1 KB
TIMEOUT = 5.0


class EngineAnswer(OSError):
    """The socket answered, but not as an engine's /version does."""


def version_at(path: str, timeout: float = TIMEOUT) -> str:
    """``Version`` of the engine at the Unix socket ``path``.

    :raises OSError: the socket cannot be reached (its errno says why), or what answered
        is not an engine (``EngineAnswer``).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
        data = b""
        while len(data) <= MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200" or len(data) > MAX_ANSWER:
        raise EngineAnswer(f"{path} did not answer /version as a Docker engine does")
    try:
        found = json.loads(body).get("Version")
    except (ValueError, AttributeError):
        found = None
    if not isinstance(found, str) or not found.isprintable() or not 0 < len(found) <= 64:
        raise EngineAnswer(f"{path} answered /version without a version")
    return found


def engine_version(where: str, sdk: Callable[[], Any],
                   unavailable: Callable[[OSError], Exception]) -> str:
    """The version of the engine at ``where`` (``unix://PATH``: over the socket; anything
    else through the SDK client ``sdk`` gives).

    :raises Exception: ``unavailable(err)`` where the socket cannot be asked.
    """
    if not where.startswith("unix://"):
        return str(sdk().version().get("Version"))
    try:
        return version_at(where[len("unix://"):])
    except OSError as err:
        raise unavailable(err) from None
