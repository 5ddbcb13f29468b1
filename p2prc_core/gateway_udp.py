"""Asking the default gateway over UDP, as NAT-PMP (RFC 6886) and PCP (RFC 6887) both do:
the request sent again after 0.25, 0.5 and 1 s (RFC 6886's retransmissions, cut short at
``TRIES``), and the first datagram from the gateway's own address and port that the
protocol's ``take`` accepts. Whatever else comes is passed over, and does not move the
deadline: a gateway's answers are untrusted input, and a stranger on the LAN may send."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection

TRIES = 3  # 0.25 + 0.5 + 1 s: a gateway that speaks the protocol answers the first
LARGEST = 1100  # PCP's largest message; NAT-PMP's are smaller


def check_map(protocols: Collection[str], protocol: str, port: int, external_port: int | None,
              lease_seconds: int, max_lease: int) -> None:
    """A port mapping's arguments, as NAT-PMP and PCP both take them, checked before
    anything is sent.

    :raises ValueError: naming the argument that is out of its range.
    """
    if protocol not in protocols:
        raise ValueError(f"protocol must be one of {tuple(protocols)}, not {protocol!r}")
    for value, name in ((port, "port"), (external_port or port, "external_port")):
        if not 1 <= value <= 65535:
            raise ValueError(f"{name} must be 1 to 65535, not {value}")
    if not 1 <= lease_seconds <= max_lease:
        raise ValueError(f"lease_seconds must be 1 to {max_lease}, not {lease_seconds}")


def gateway_or_default(gateway: str | None) -> str | None:
    """``gateway``, or where none is set, this host's default IPv4 gateway (None without one)."""
    if gateway is not None:
        return gateway
    from p2prc_core.addresses import default_gateway

    return default_gateway()


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
