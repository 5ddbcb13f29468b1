"""Port mapping with PCP (RFC 6887), NAT-PMP's successor on the same UDP port 5351, which
miniupnpd and many routers speak: the same calls as ``natpmp.NatPmpMapper`` (discover, map,
renew, unmap), tried before NAT-PMP (``natpmp.find_gateway``).

Each mapping is a MAP request that names this host's address toward the gateway and a random
nonce; the gateway renews or removes a mapping only for a request with the same nonce, so
the nonce is kept with the mapper that made it, and in the node's home (``pcp.json``, 0600:
a server restarted, or a worker that took the job over, maps with it again, where a gateway
would refuse a new nonce until the old mapping ran out), not in the ``Mapping`` that
``p2prc status`` shows. A gateway that speaks NAT-PMP only answers a PCP request with
NAT-PMP's "unsupported version": that is a plain "no PCP here", and NAT-PMP is asked next.

Answers are untrusted input, as NAT-PMP's are: taken only from the gateway's address and
port, of the exact size of the answer asked for (no options: none are asked for), with the
response bit and the opcode, nonce, protocol and internal port of the request, a success
code, and an external address that is IPv4.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
import threading
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2prc_core.errors import P2PRCError
from p2prc_core.gateway_udp import ask_gateway, check_map, gateway_or_default

if TYPE_CHECKING:
    from p2prc_core.upnp import Mapping

PORT = 5351
VERSION = 2
MAX_LEASE = 604800
NONCES_FILE = "pcp.json"  # in the node's home: "PROTOCOL:PORT" -> the mapping's nonce (hex)
_ANNOUNCE, _MAP = 0, 1  # opcodes; an answer's has the response bit (128) set
_PROTOCOLS = {"TCP": 6, "UDP": 17}
_HEADER = 24
_MAP_SIZE = _HEADER + 36
RESULTS = {1: "unsupported version", 2: "not authorized (is PCP enabled for this host?)",
           3: "malformed request", 4: "unsupported opcode", 5: "unsupported option",
           6: "malformed option", 7: "network failure (the gateway has no external address "
           "yet)", 8: "no resources (no port left)", 9: "unsupported protocol",
           10: "the host's quota of mappings is used", 11: "cannot give that external port",
           12: "address mismatch (a NAT between this host and the gateway?)",
           13: "excessive remote peers"}


class PcpError(P2PRCError):
    """The gateway refused, or answered nothing usable."""


class NotPcp(PcpError):
    """The gateway answered, in NAT-PMP: it does not speak PCP."""


def _mapped(address: str) -> bytes:
    """An IPv4 address as PCP carries it: IPv4-mapped IPv6 (``::ffff:a.b.c.d``)."""
    return ipaddress.IPv6Address(f"::ffff:{address}").packed


class PcpMapper:
    """Maps, renews and removes TCP and UDP port forwards on the default gateway with
    PCP MAP requests."""

    def __init__(self, gateway: str | None = None, timeout: float = 0.25, port: int = PORT,
                 home: Path | None = None):
        self.gateway = gateway
        self.port = port
        self.first_wait = timeout  # the first retransmission's; doubled each time
        self._lock = threading.Lock()
        self._kept = home / NONCES_FILE if home is not None else None

    def _nonce(self, protocol: str, port: int, new: bool = True) -> bytes | None:
        """The nonce of this host's mapping of ``protocol`` ``port`` (a new one, kept, when
        there is none and ``new``)."""
        from p2prc_core.storage import update_json

        key = f"{protocol}:{port}"

        def take(kept: dict[str, Any]) -> str | None:
            found = kept.get(key)
            if not (isinstance(found, str) and re.fullmatch("[0-9a-f]{24}", found)):
                found = os.urandom(12).hex() if new else None
                if found is not None:
                    kept[key] = found
            return found

        if self._kept is None:
            found = take(self._memory)
        else:
            found = update_json(self._kept, take)
            os.chmod(self._kept, 0o600)
        return bytes.fromhex(found) if found else None

    def _forget(self, protocol: str, port: int) -> None:
        from p2prc_core.storage import update_json

        key = f"{protocol}:{port}"
        if self._kept is None:
            self._memory.pop(key, None)
        else:
            update_json(self._kept, lambda kept: kept.pop(key, None))

    @cached_property
    def _memory(self) -> dict[str, Any]:  # the nonces, where no home keeps them
        return {}

    def discover(self) -> bool:
        """Whether the default gateway answers PCP (an ANNOUNCE, answered with success)."""
        self.gateway = gateway_or_default(self.gateway)
        if self.gateway is None:
            return False
        try:
            self._ask(self._header(_ANNOUNCE, 0), _ANNOUNCE, _HEADER, (b"", b""))
        except PcpError:
            return False
        return True

    def map(self, port: int, external_port: int | None = None, lease_seconds: int = 3600,
            description: str = "p2prc", protocol: str = "TCP") -> Mapping:
        """Forward ``external_port`` (``port`` by default, a suggestion the gateway may
        not follow) to ``port`` here, for ``protocol`` (TCP or UDP); the mapping says which
        port and lease the gateway gave. ``description`` is not sent: PCP has none."""
        check_map(_PROTOCOLS, protocol, port, external_port, lease_seconds, MAX_LEASE)
        nonce = self._nonce(protocol, port)
        assert nonce is not None
        answer = self._send_map(nonce, protocol, port, external_port or port, lease_seconds)
        from p2prc_core.upnp import Mapping, local_address

        lease = struct.unpack(">I", answer[4:8])[0]
        given = struct.unpack(">H", answer[_HEADER + 18:_HEADER + 20])[0]
        external = ipaddress.IPv6Address(answer[_HEADER + 20:_MAP_SIZE])
        if external.ipv4_mapped is None or not 1 <= given <= 65535:
            raise PcpError(f"the gateway answered a mapping to {external} port {given}, not "
                           f"to an IPv4 address and port")
        return Mapping(str(external.ipv4_mapped), given, local_address(self.gateway or ""),
                       port, protocol, lease, f"PCP at {self.gateway}")

    def renew(self, mapping: Mapping) -> Mapping:
        """Ask for the same forward again, with the nonce that made it."""
        return self.map(mapping.internal_port, mapping.external_port,
                        min(mapping.lease_seconds, MAX_LEASE) or 3600,
                        protocol=mapping.protocol)

    def unmap(self, mapping: Mapping) -> None:
        """Remove the forward (a MAP with lifetime 0 and the nonce that made it)."""
        nonce = self._nonce(mapping.protocol, mapping.internal_port, new=False)
        if nonce is None:
            raise PcpError(f"no mapping of {mapping.protocol} port {mapping.internal_port} "
                           f"made here to remove")
        self._send_map(nonce, mapping.protocol, mapping.internal_port, 0, 0)
        self._forget(mapping.protocol, mapping.internal_port)  # (kept until it is gone)

    def _header(self, opcode: int, lifetime: int) -> bytes:
        from p2prc_core.upnp import local_address

        if self.gateway is None:
            raise PcpError("no default gateway to ask")
        try:
            here = local_address(self.gateway)
        except OSError as err:  # no route to it now (the network went away)
            raise PcpError(f"cannot reach the gateway {self.gateway}: {err.strerror}") \
                from None
        return struct.pack(">BBHI16s", VERSION, opcode, 0, lifetime, _mapped(here))

    def _send_map(self, nonce: bytes, protocol: str, port: int, external_port: int,
                  lifetime: int) -> bytes:
        body = struct.pack(">12sB3xHH16s", nonce, _PROTOCOLS[protocol], port, external_port,
                           _mapped("0.0.0.0"))  # any external address
        # The answer repeats the nonce, protocol and internal port: an answer to another
        # request (or a forgery without the nonce) is passed over.
        echo = (nonce + bytes([_PROTOCOLS[protocol]]), struct.pack(">H", port))
        return self._ask(self._header(_MAP, lifetime) + body, _MAP, _MAP_SIZE, echo)

    def _ask(self, request: bytes, opcode: int, size: int, echo: tuple[bytes, bytes]) -> bytes:
        """``request`` sent to the gateway (``gateway_udp``); its answer of ``size`` bytes
        for ``opcode`` that repeats ``echo``, with success.

        :raises NotPcp: the gateway answered in NAT-PMP (it speaks only that).
        :raises PcpError: no such answer within ``TRIES`` sends; or a refusal (its reason).
        """
        if self.gateway is None:
            raise PcpError("no default gateway to ask")
        gateway = self.gateway

        def take(data: bytes) -> bytes | None:
            if len(data) in (8, 12, 16) and data[0] == 0 and data[1] >= 128 and \
                    struct.unpack(">H", data[2:4])[0] == 1:
                raise NotPcp(f"the gateway {gateway} speaks NAT-PMP, not PCP")
            if len(data) != size or data[0] != VERSION or data[1] != 128 + opcode or \
                    not _repeats(data, *echo):
                return None
            if data[3]:
                raise PcpError(f"the gateway {gateway} refused: "
                               f"{RESULTS.get(data[3], f'result {data[3]}')}")
            return data

        with self._lock:
            return ask_gateway(gateway, self.port, request, self.first_wait, take, PcpError,
                               "PCP")


def _repeats(data: bytes, nonce_protocol: bytes, port: bytes) -> bool:
    """Whether a MAP answer repeats the request's nonce and protocol, and its internal port
    (past three reserved bytes, which are not looked at); an ANNOUNCE repeats nothing."""
    if not nonce_protocol:
        return True
    start = _HEADER + len(nonce_protocol)
    return data[_HEADER:start] == nonce_protocol and data[start + 3:start + 5] == port
