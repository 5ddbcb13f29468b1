"""Bytes from one thread to another in this process, with no pipe between: an exec stream's
thread and the archive code that packs its inputs or unpacks its outputs. A pipe costs two
copies through the kernel and a wake-up per block; here a block moves as the same object.
"""

from __future__ import annotations

import threading
from collections import deque

HELD = 1 << 20  # the most that waits for the reader: the writer waits for room (back pressure)
_SMALLEST = 1024  # what a block costs at least: a million 1-byte blocks would hold 40 MiB


def _cost(block: bytes) -> int:
    return max(len(block), _SMALLEST)


class Handoff:
    """A one-way stream between two threads, with a pipe's ends: the writer's ``write`` and
    ``end`` (the reader then reads to its end, then ``b""``), the reader's ``read`` and
    ``close`` (later writes raise ``BrokenPipeError``, as a pipe's do; what waits is
    dropped). At most about ``held`` bytes and one more block wait (a block under
    ``_SMALLEST`` bytes counts as that many)."""

    def __init__(self, held: int = HELD) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0  # bytes waiting
        self._offset = 0  # where the first block's unread part begins
        self._charged = 0  # what the blocks waiting cost: each at least _SMALLEST
        self._held = held
        self._ended = False
        self.closed = False
        self._turn = threading.Condition()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hand ``data`` on (a copy: a view's buffer may be reused once this returns), once
        fewer than ``held`` bytes wait. :raises BrokenPipeError: the reader closed its end."""
        chunk = bytes(data)
        with self._turn:
            while self._charged >= self._held and not self.closed:
                self._turn.wait()
            if self.closed:
                raise BrokenPipeError("the reader stopped reading")
            if chunk:
                self._chunks.append(chunk)
                self._size += len(chunk)
                self._charged += _cost(chunk)
                self._turn.notify_all()
        return len(chunk)

    def end(self) -> None:
        """The writer's end: the reader gets what waits, then ``b""``."""
        with self._turn:
            self._ended = True
            self._turn.notify_all()

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that waits, for -1), once there are any; ``b""`` at the
        end, or once closed. A block read whole is the block written, not a copy."""
        if size == 0:
            return b""  # as a pipe's read(0), at once (gzip asks for 0 bytes at times)
        with self._turn:
            while not self._chunks and not self._ended and not self.closed:
                self._turn.wait()
            if not self._chunks:
                return b""
            want = self._size if size < 0 else min(size, self._size)
            parts: list[bytes | memoryview] = []
            left = want
            while left:
                block = self._chunks[0]
                there = len(block) - self._offset
                if there <= left:
                    parts.append(memoryview(block)[self._offset:] if self._offset else block)
                    self._chunks.popleft()
                    self._charged -= _cost(block)
                    self._offset = 0
                    left -= there
                else:
                    parts.append(memoryview(block)[self._offset:self._offset + left])
                    self._offset += left
                    left = 0
            self._size -= want
            self._turn.notify_all()
            only = parts[0]
            return only if len(parts) == 1 and isinstance(only, bytes) else b"".join(parts)

    def close(self) -> None:
        """The reader's end: what waits is dropped, and the writer is told at its next
        write."""
        with self._turn:
            self.closed = True
            self._chunks.clear()
            self._size = self._offset = self._charged = 0
            self._turn.notify_all()
