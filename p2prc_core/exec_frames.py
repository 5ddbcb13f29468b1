"""The frames of an exec stream (``POST /v1/containers/{id}/exec``), both ways, after the
101: Docker's own multiplexed-stream frame, ``kind``, three zero bytes, then the payload's
size (4 bytes, big-endian), then the payload. What the host's engine sends comes through as
it is; the host adds the rest. Imports nothing heavy: the exec client starts with it.

Caller to host: ``START`` (first, once: a ``wire.ExecStart``), then ``STDIN`` bytes and one
``STDIN_END``. Host to caller: ``STDOUT`` and ``STDERR`` bytes, then ``EXIT`` (the exit
code, as decimal text) or ``ERROR`` (why it could not run, as text), and the stream ends.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

STDIN, STDOUT, STDERR, EXIT, START, STDIN_END, ERROR = 0, 1, 2, 3, 4, 5, 6
HEADER = 8
MAX_PAYLOAD = 1 << 20  # a frame's payload, either way: more is a broken or hostile peer
MAX_START = 256 << 10  # a START's payload (the command line, its script and environment)


class FrameError(ValueError):
    """Bytes that are not a frame of this protocol (a kind out of place, a size too big)."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BxxxI", kind, len(payload)) + payload


def frames(data: bytearray, kinds: frozenset[int], limit: int = MAX_PAYLOAD,
           most: int = 1 << 30) -> list[tuple[int, bytes]]:
    """Take the whole frames (``most`` at most) off the front of ``data`` (what is left stays
    there).

    :raises FrameError: a kind not among ``kinds``, nonzero padding, or a payload over
        ``limit``.
    """
    taken: list[tuple[int, bytes]] = []

    def keep(kind: int, payload: memoryview) -> bool:
        taken.append((kind, bytes(payload)))
        return len(taken) >= most

    each(data, kinds, keep, limit)
    return taken


def each(data: bytearray, kinds: frozenset[int], handle: Callable[[int, memoryview], bool],
         limit: int = MAX_PAYLOAD) -> None:
    """Hand each whole frame at the front of ``data`` to ``handle`` (its kind, and a view of
    its payload that is good only during the call: no copy is made), then cut them off
    ``data`` at once; ``handle`` returning True stops after that frame.

    :raises FrameError: as ``frames``; the frames handled before it are cut off.
    """
    at = 0  # one cut at the end: a cut per frame would move the rest each time
    view = memoryview(data)
    try:
        while len(data) - at >= HEADER:
            kind, size = data[at], int.from_bytes(data[at + 4:at + 8], "big")
            if kind not in kinds or data[at + 1:at + 4] != b"\0\0\0":
                raise FrameError(f"a frame of unknown kind {kind}")
            if size > limit:
                raise FrameError(f"a frame of {size} bytes (at most {limit})")
            if len(data) - at < HEADER + size:
                break
            with view[at + HEADER:at + HEADER + size] as payload:
                at += HEADER + size
                if handle(kind, payload):
                    break
    except BaseException:
        view.release()
        # A handler's error may hold a view of ``data`` in its traceback (a write that
        # failed): ``data`` cannot be cut then, and the error, not that, is what is said.
        with contextlib.suppress(BufferError):
            del data[:at]
        raise
    view.release()
    del data[:at]
