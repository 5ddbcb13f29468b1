"""QUIC on a host's UDP socket, for the punched paths that reach it (issue 24).

``QuicSide`` puts aioquic's server on one socket's transport, inside the bounds a stranger
must not get past:

- **Only agreed paths.** A long-header packet (an Initial, a Handshake) is taken only from a
  source an offer admitted (``admitted``; ``udp_endpoint`` says how a source is admitted),
  even for a connection that exists; a packet of a QUIC version this side does not speak is
  dropped, never answered with Version Negotiation (which a forged source would receive).
- **The source proven.** Every new connection first gets a Retry (RFC 9000, 8.1): it goes
  on only from the address that received the Retry's token, so a forged Initial makes this
  side send no more than a Retry, smaller than the Initial.
- **Few links.** At most ``MAX_LINKS`` connections at once on all of the node's sockets
  (``Budget``), ``LINKS_PER_SOURCE`` from one address and port, ``LINKS_PER_ADDRESS`` from
  one IP address, and strangers (sources an untrusted caller's offer admitted) at most half.
- **No moving.** A connection's packets from anywhere but its own path are dropped unless
  that source was admitted too: a forged source cannot have the connection follow it (QUIC
  would send it a path challenge, three times the size of what it sent).
- **Few streams.** Each stream stands for one TCP connection to this node's server, so at
  most ``STREAMS_PER_LINK`` at once on one connection and ``MAX_STREAMS`` on all: past
  them, a new stream is refused (stopped and reset), as the server's own per-source limit
  would refuse one more connection; a stream only one way is refused always. A stream's
  unread data is bounded too (``quic_link.BoundedProtocol``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from p2prc_core import punch, quic_link

log = logging.getLogger("p2prc.udp")

MAX_LINKS = 64  # QUIC connections at once, on all of this node's sockets
LINKS_PER_SOURCE = 2  # of them from one source address and port
LINKS_PER_ADDRESS = 16  # from one IP address (a household behind one NAT)
STREAMS_PER_LINK = 32  # streams joined at once on one connection (a source's TCP share)
MAX_STREAMS = 256  # streams joined at once on all connections

# source -> (admitted, by a trusted caller's offer); see udp_endpoint.UdpEndpoint.admission
Admission = Callable[[tuple[str, int]], tuple[bool, bool]]


class Budget:
    """The bounds every ``QuicSide`` of one node shares (its UDP port's, and a spread's
    winning sockets'): the connections each holds, where each came from, whose offer let
    it in, and the streams joined now."""

    def __init__(self) -> None:
        self.sides: list[QuicSide] = []
        self.origin: dict[Any, tuple[tuple[str, int], bool]] = {}  # -> source, trusted
        self.streams = 0

    def connections(self) -> list[Any]:
        alive = {c for side in self.sides for c in side.server._protocols.values()}
        self.origin = {c: o for c, o in self.origin.items() if c in alive}
        return list(alive)

    def room_for(self, source: tuple[str, int], trusted: bool) -> bool:
        connections = self.connections()
        if len(connections) >= MAX_LINKS:
            return False
        origins = [self.origin.get(c, (("", 0), False)) for c in connections]
        if not trusted and sum(not t for _, t in origins) >= MAX_LINKS // 2:
            return False
        return sum(o == source for o, _ in origins) < LINKS_PER_SOURCE and \
            sum(o[0] == source[0] for o, _ in origins) < LINKS_PER_ADDRESS


class QuicSide:
    """aioquic's server on one UDP socket's transport (see the module's docstring), within
    ``budget``; each stream joined to this node's own server at ``local``."""

    def __init__(self, transport: asyncio.DatagramTransport, cert: str, key: str,
                 local: tuple[str, int], admission: Admission, budget: Budget):
        self.local = local
        self.admission = admission
        self.budget = budget
        self.config = quic_link.configuration(False, cert, key)
        self.server = QuicServer(configuration=self.config, retry=True,
                                 create_protocol=quic_link.BoundedProtocol,
                                 stream_handler=self._stream)
        self.server.connection_made(transport)
        budget.sides.append(self)

    def connections(self) -> list[Any]:
        return list(set(self.server._protocols.values()))

    @property
    def links(self) -> int:
        return len(self.connections())

    def receive(self, data: bytes, addr: Any) -> None:
        """A datagram that is neither a probe nor a punch packet: QUIC, if it may be."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return
        source = (punch.plain_host(addr[0]), addr[1])
        known = self.server._protocols.get(header.destination_cid)
        admitted, trusted = self.admission(source)
        if header.packet_type != QuicPacketType.ONE_RTT:  # a long header
            if header.version not in self.config.supported_versions:
                return  # no Version Negotiation: it would go to whoever the source claims
            if not admitted:
                return  # no path was agreed with this source
            if known is None and not self.budget.room_for(source, trusted):
                return
        elif known is None:
            return
        elif not admitted and _address(known) != source:
            return  # a connection moves only to where a path was agreed (no reflection)
        if known is not None:  # the hot path: a packet of a connection there is
            self.server.datagram_received(data, addr)
            return
        before = set(self.server._protocols.values())
        self.server.datagram_received(data, addr)
        for made in set(self.server._protocols.values()) - before:
            self.budget.origin[made] = (source, trusted)

    def close(self) -> None:
        self.budget.sides = [s for s in self.budget.sides if s is not self]
        self.server.close()

    def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        adapter: Any = writer.transport
        protocol: quic_link.BoundedProtocol = adapter.protocol
        bidirectional = adapter.stream_id % 4 == 0  # a client's; all a client may open
        if not bidirectional or protocol.joined >= STREAMS_PER_LINK or \
                self.budget.streams >= MAX_STREAMS:
            protocol.end(adapter.stream_id)  # refused: as one connection too many would be
            if bidirectional:
                with contextlib.suppress(Exception):  # it ended meanwhile
                    protocol._quic.reset_stream(adapter.stream_id, 0)
            protocol.transmit()
            return
        protocol.joined += 1
        self.budget.streams += 1
        quic_link.keep(self._to_server(reader, writer, protocol))

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         protocol: quic_link.BoundedProtocol) -> None:
        try:
            try:
                local = await asyncio.wait_for(asyncio.open_connection(*self.local), 5)
            except (OSError, TimeoutError) as err:
                log.warning("a punched stream: our own server does not answer: %s", err)
                writer.close()
                return
            local[1].get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                         socket.TCP_NODELAY, 1)
            await quic_link.join((reader, writer), local)
        finally:
            protocol.joined -= 1
            self.budget.streams -= 1


def _address(protocol: Any) -> tuple[str, int] | None:
    """Where ``protocol``'s connection now sends (its validated path)."""
    paths = protocol._quic._network_paths
    return (punch.plain_host(paths[0].addr[0]), paths[0].addr[1]) if paths else None
