"""A fake gateway on 127.0.0.1 for the NAT-PMP and PCP tests: a UDP socket that answers
each request as it is told (honestly or not), and keeps what it was asked."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

M = TypeVar("M")

Answer = Callable[[bytes], list[bytes]]  # a request -> the datagrams sent back


class FakeGateway:
    def __init__(self, answer: Answer):
        self.answer = answer
        self.asked: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def serve(self) -> None:
        while True:
            try:
                request, peer = self.sock.recvfrom(1100)
            except OSError:
                return
            self.asked.append(request)
            for datagram in self.answer(request):
                self.sock.sendto(datagram, peer)


@contextmanager
def fake_gateway(answer: Answer) -> Iterator[FakeGateway]:
    """A gateway answering with ``answer`` (change it through ``.answer``) until the end."""
    gateway = FakeGateway(answer)
    threading.Thread(target=gateway.serve, daemon=True).start()
    try:
        yield gateway
    finally:
        gateway.sock.close()


@contextmanager
def mapper_maker(mapper: Callable[..., M], first: Answer) -> Iterator[Callable[[Answer], M]]:
    """Makes ``mapper``s (NatPmpMapper, PcpMapper) that ask one fake gateway, which answers
    as the last call said (``first`` until then); each mapper has ``asked``, what the
    gateway was asked."""
    with fake_gateway(first) as fake:

        def make(how: Answer) -> M:
            fake.answer = how
            made: Any = mapper("127.0.0.1", timeout=0.05, port=fake.port)
            made.asked = fake.asked
            return made  # type: ignore[no-any-return]

        yield make
