"""Asking the default gateway over UDP, as NAT-PMP (RFC 6886) and PCP (RFC 6887) both do:
the request sent again after 0.25, 0.5 and 1 s (RFC 6886's retransmissions, cut short at
``TRIES``), and the first datagram from the gateway's own address and port that the
protocol's ``take`` accepts. Whatever else comes is passed over, and does not move the
deadline: a gateway's answers are untrusted input, and a stranger on the LAN may send."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

TRIES = 3  # 0.25 + 0.5 + 1 s: a gateway that speaks the protocol answers the first
LARGEST = 1100  # PCP's largest message; NAT-PMP's are smaller


def ask_gateway(gateway: str, port: int, request: bytes, first_wait: float,
                take: Callable[[bytes], bytes | None],
                failure: Callable[[str], Exception], protocol: str) -> bytes:
    """``request`` sent to ``gateway``:``port``; the first answer ``take`` returns (it
    returns None for a datagram that is not the answer, and raises for a refusal).

    :raises Exception: ``failure(why)`` when the gateway cannot be reached, or sends no
        answer ``take`` accepts within ``TRIES`` sends.
    """
    where = (gateway, port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        wait = first_wait
        for _ in range(TRIES):
            try:
                sock.sendto(request, where)
            except OSError as err:
                raise failure(f"cannot reach the gateway {gateway}: {err.strerror}") from None
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, source = sock.recvfrom(LARGEST)
                except (TimeoutError, OSError):
                    break
                if source != where:
                    continue
                answer = take(data)
                if answer is not None:
                    return answer
            wait *= 2
    raise failure(f"the gateway {gateway} did not answer {protocol}")
