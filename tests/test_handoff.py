"""``Handoff``: bytes between two threads of this process, as a pipe carries them (order,
back pressure, both ends), without the pipe."""

from __future__ import annotations

import os
import threading

import pytest
from faultkit import wait_for

from p2prc_core.handoff import Handoff


def test_what_is_written_is_read_in_order_whatever_the_sizes() -> None:
    chunks = [os.urandom(n) for n in (1, 0, 70_000, 3, 65_536, 200_000, 17)]
    handoff = Handoff(held=100_000)
    writer = threading.Thread(target=lambda: ([handoff.write(memoryview(c)) for c in chunks],
                                              handoff.end()))
    writer.start()
    got = bytearray()
    for size in (5, 65_536, 1, 262_144, -1, 4096) * 100:
        if not (data := handoff.read(size)):
            break
        assert len(data) <= size or size < 0
        got += data
    writer.join(10)
    assert bytes(got) == b"".join(chunks) and handoff.read(10) == b""


def test_a_block_read_whole_is_not_copied() -> None:
    handoff = Handoff()
    block = os.urandom(65_536)
    handoff.write(block)
    assert handoff.read(65_536) is block


def test_the_writer_waits_for_room_and_goes_on_once_there_is() -> None:
    handoff = Handoff(held=8192)
    handoff.write(b"x" * 8192)
    wrote = threading.Event()
    thread = threading.Thread(target=lambda: (handoff.write(b"y"), wrote.set()), daemon=True)
    thread.start()
    thread.join(0.2)
    assert not wrote.is_set()  # held: 8 KiB wait
    assert handoff.read(4096) == b"x" * 4096
    thread.join(0.2)
    assert not wrote.is_set()  # a block frees its room once read whole
    assert handoff.read(4096) == b"x" * 4096
    wait_for(wrote.is_set, 10, "the write once there was room")
    assert handoff.read(-1) == b"y"


def test_a_reader_that_stops_stops_a_waiting_writer() -> None:
    """As a pipe closed at its read end: the writer gets BrokenPipeError, never waits on."""
    handoff = Handoff(held=4)
    handoff.write(b"full")
    failed: list[BaseException] = []

    def write() -> None:
        try:
            handoff.write(b"more")
        except BrokenPipeError as err:
            failed.append(err)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    handoff.close()
    thread.join(10)
    assert failed and not thread.is_alive()
    with pytest.raises(BrokenPipeError):
        handoff.write(b"later")
    assert handoff.read(10) == b""


def test_a_reader_waits_until_the_writer_ends() -> None:
    handoff = Handoff()
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(handoff.read(10)), daemon=True)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()  # nothing yet, and no end
    handoff.end()
    thread.join(10)
    assert got == [b""]


def test_a_read_of_nothing_is_answered_at_once() -> None:
    """As a pipe's: gzip asks for 0 bytes at times (an empty extra field a host may send)."""
    handoff = Handoff()
    assert handoff.read(0) == b""  # nothing written yet: no wait
    handoff.write(b"abc")
    assert handoff.read(0) == b"" and handoff.read(3) == b"abc"


def test_tiny_blocks_cannot_hold_much_more_than_the_limit() -> None:
    """A host that sends one byte a frame: each block counts as at least 1 KiB, so the
    writer waits after about held / 1 KiB of them, not after a million."""
    handoff = Handoff(held=64 << 10)
    written = 0

    def write() -> None:
        nonlocal written
        try:
            while True:
                handoff.write(b"x")
                written += 1
        except BrokenPipeError:
            pass  # the reader closed: the end

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    wait_for(lambda: written >= 64, 10, "64 writes")
    thread.join(0.3)  # it waits for room now
    assert 64 <= written <= 65
    assert handoff.read(-1) == b"x" * written
    handoff.close()
