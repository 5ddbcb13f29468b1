"""Dialling a peer with several addresses: happy eyeballs over real loopback sockets."""

from __future__ import annotations

import socket
import time

import pytest

from p2prc_core.channel import Channel
from p2prc_core.errors import PeerError
from p2prc_core.models import Endpoint


def stalled_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A port whose accept queue is full: the kernel drops new SYNs, so a connect hangs, as
    it does to an address that silently drops packets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    port = listener.getsockname()[1]
    for _ in range(8):  # fill the queue; later connects stay in SYN_SENT
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    return listener, fillers


def test_a_dead_first_address_costs_a_stagger_not_a_timeout() -> None:
    dead, fillers = stalled_listener()
    alive = socket.create_server(("127.0.0.1", 0))
    channel = Channel([Endpoint("127.0.0.1", dead.getsockname()[1]),
                       Endpoint("127.0.0.1", alive.getsockname()[1])], secure=False)
    try:
        started = time.monotonic()
        sock = channel.connect(timeout=10)
        took = time.monotonic() - started
        sock.close()
        assert channel.endpoint.port == alive.getsockname()[1]  # used from now on
        assert took < 2, took  # one at a time: 3 s (the per-address cap), or the whole 10 s
    finally:
        for s in (dead, alive, *fillers):
            s.close()


def test_every_address_failing_is_one_error_that_names_each() -> None:
    closed = []
    for _ in range(2):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closed.append(probe.getsockname()[1])
        probe.close()
    channel = Channel([Endpoint("127.0.0.1", port) for port in closed], secure=False)
    with pytest.raises(PeerError) as caught:
        channel.connect(timeout=5)
    message = str(caught.value)
    assert message.startswith("no path to this peer works")
    assert all(f"127.0.0.1:{port}" in message for port in closed)
