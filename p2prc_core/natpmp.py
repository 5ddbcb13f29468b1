"""Port mapping with NAT-PMP (RFC 6886), which many routers offer instead of UPnP IGD, and
miniupnpd beside it: the same calls as ``upnp.PortMapper`` (discover, map, renew, unmap), so
that the server's reach agent uses whichever gateway answers (``find_gateway``; PCP, its
successor, is ``pcp``'s and asked first).

The gateway is the default route's (IPv4), asked at UDP port 5351, with RFC 6886's
retransmissions (250 ms, doubling) cut short at ``gateway_udp.TRIES``. Its answers are
untrusted input: taken only from the gateway's address and port, of the exact size and
opcode asked for, with a success code, and an external address that is IPv4.
"""

from __future__ import annotations

import ipaddress
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2prc_core.errors import P2PRCError
from p2prc_core.gateway_udp import ask_gateway, check_map, gateway_or_default

if TYPE_CHECKING:  # upnp's module loads its HTTP client: only where a mapping is made
    from p2prc_core.upnp import Mapping

PORT = 5351
MAX_LEASE = 604800
_EXTERNAL = 0  # opcodes; an answer's is the request's + 128
_MAP = {"UDP": 1, "TCP": 2}
RESULTS = {1: "unsupported version", 2: "not authorized or refused (is NAT-PMP enabled for "
           "this host?)", 3: "network failure (the gateway has no external address yet)",
           4: "out of resources (no port left)", 5: "unsupported opcode"}


class NatPmpError(P2PRCError):
    """The gateway refused, or answered nothing usable."""


class NatPmpMapper:
    """Maps, renews and removes TCP and UDP port forwards on the default gateway with
    NAT-PMP."""

    def __init__(self, gateway: str | None = None, timeout: float = 0.25, port: int = PORT):
        self.gateway = gateway
        self.port = port
        self.first_wait = timeout  # the first retransmission's; doubled each time
        self._lock = threading.Lock()

    def discover(self) -> bool:
        """Whether the default gateway answers NAT-PMP (with its external address)."""
        self.gateway = gateway_or_default(self.gateway)
        if self.gateway is None:
            return False
        try:
            self.external_ip()
        except NatPmpError:
            return False
        return True

    def external_ip(self) -> str:
        """The gateway's external IPv4 address."""
        answer = self._ask(struct.pack(">BB", 0, _EXTERNAL), _EXTERNAL, 12)
        return str(ipaddress.IPv4Address(answer[8:12]))

    def map(self, port: int, external_port: int | None = None, lease_seconds: int = 3600,
            description: str = "p2prc", protocol: str = "TCP") -> Mapping:
        """Forward ``external_port`` (``port`` by default) to ``port`` here, for
        ``protocol`` (TCP or UDP); the gateway may give another external port, or a shorter
        lease (the mapping says which). ``description`` is not sent: NAT-PMP has none."""
        check_map(_MAP, protocol, port, external_port, lease_seconds, MAX_LEASE)
        external = self.external_ip()
        opcode = _MAP[protocol]
        answer = self._ask(struct.pack(">BBHHHI", 0, opcode, 0, port, external_port or port,
                                       lease_seconds), opcode, 16)
        from p2prc_core.upnp import Mapping, local_address

        internal, given, lease = struct.unpack(">HHI", answer[8:16])
        if internal != port or not 1 <= given <= 65535:
            raise NatPmpError(f"the gateway answered a mapping of port {internal} to {given}, "
                              f"not of port {port}")
        return Mapping(external, given, local_address(self.gateway or "0.0.0.0"), port,
                       protocol, lease, f"NAT-PMP at {self.gateway}")

    def renew(self, mapping: Mapping) -> Mapping:
        """Ask for the same forward again (NAT-PMP renews by mapping anew)."""
        return self.map(mapping.internal_port, mapping.external_port,
                        min(mapping.lease_seconds, MAX_LEASE) or 3600,
                        protocol=mapping.protocol)

    def unmap(self, mapping: Mapping) -> None:
        """Remove the forward (lifetime 0)."""
        opcode = _MAP[mapping.protocol]
        self._ask(struct.pack(">BBHHHI", 0, opcode, 0, mapping.internal_port, 0, 0), opcode, 16)

    def _ask(self, request: bytes, opcode: int, size: int) -> bytes:
        """``request`` sent to the gateway (``gateway_udp``); its answer of ``size`` bytes
        for ``opcode``, with success.

        :raises NatPmpError: no such answer within ``TRIES`` sends; or a refusal (its
            reason).
        """
        if self.gateway is None:
            raise NatPmpError("no default gateway to ask")
        gateway = self.gateway

        def take(data: bytes) -> bytes | None:
            if len(data) != size or data[0] != 0 or data[1] != 128 + opcode:
                return None
            result = struct.unpack(">H", data[2:4])[0]
            if result:
                raise NatPmpError(f"the gateway {gateway} refused: "
                                  f"{RESULTS.get(result, f'result {result}')}")
            return data

        with self._lock:
            return ask_gateway(gateway, self.port, request, self.first_wait, take,
                               NatPmpError, "NAT-PMP")


def find_gateway(timeout: float = 3.0, home: Path | None = None) -> Any:
    """A mapper whose gateway answered, UPnP IGD first (found by SSDP), then PCP and then
    NAT-PMP at the default gateway (a gateway that speaks NAT-PMP only says so to PCP's
    first request at once); None when none did."""
    try:
        from p2prc_core.upnp import PortMapper
    except ImportError:  # its HTTP client missing: NAT-PMP alone
        pass
    else:
        upnp = PortMapper(timeout)
        if upnp.discover():
            return upnp
    from p2prc_core.addresses import default_gateway
    from p2prc_core.pcp import PcpMapper

    gateway = default_gateway()
    if gateway is None:
        return None
    pcp = PcpMapper(gateway, home=home)  # (its nonces kept in the home)
    if pcp.discover():
        return pcp
    natpmp = NatPmpMapper(gateway)
    return natpmp if natpmp.discover() else None
