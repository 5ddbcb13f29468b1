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
- **Few links.** At most ``MAX_LINKS`` connections at once, ``LINKS_PER_SOURCE`` from one
  address, and strangers (sources an untrusted caller's offer admitted) at most half.
- **Few streams.** Each stream stands for one TCP connection to this node's server, so at
  most ``STREAMS_PER_LINK`` at once on one connection and ``MAX_STREAMS`` on all: past
  them, a new stream is refused (stopped and reset), as the server's own per-source limit
  would refuse one more connection. A stream's unread data is bounded too
  (``quic_link.BoundedProtocol``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from p2prc_core import quic_link

log = logging.getLogger("p2prc.udp")

MAX_LINKS = 64  # QUIC connections at once, on one socket
LINKS_PER_SOURCE = 2  # of them from one address
STREAMS_PER_LINK = 32  # streams joined at once on one connection (a source's TCP share)
MAX_STREAMS = 256  # streams joined at once on all connections of one socket

# source -> (admitted, by a trusted caller's offer); see udp_endpoint.UdpEndpoint.admission
Admission = Callable[[tuple[str, int]], tuple[bool, bool]]


class QuicSide:
    """aioquic's server on one UDP socket's transport (see the module's docstring); each
    stream joined to this node's own server at ``local``."""

    def __init__(self, transport: asyncio.DatagramTransport, cert: str, key: str,
                 local: tuple[str, int], admission: Admission):
        self.local = local
        self.admission = admission
        self.config = quic_link.configuration(False, cert, key)
        self.server = QuicServer(configuration=self.config, retry=True,
                                 create_protocol=quic_link.BoundedProtocol,
                                 stream_handler=self._stream)
        self.server.connection_made(transport)
        self.streams = 0  # joined now, on all connections
        self._strangers: set[Any] = set()  # connections a stranger's offer let in

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
        source = (_plain(addr[0]), addr[1])
        if header.packet_type != QuicPacketType.ONE_RTT:  # a long header
            if header.version not in self.config.supported_versions:
                return  # no Version Negotiation: it would go to whoever the source claims
            admitted, trusted = self.admission(source)
            if not admitted:
                return  # no path was agreed with this source
            known = header.destination_cid in self.server._protocols
            if not known and not self._room_for(source, trusted):
                return
        elif header.destination_cid not in self.server._protocols:
            return
        before = set(self.server._protocols.values())
        self.server.datagram_received(data, addr)
        if header.packet_type != QuicPacketType.ONE_RTT and not self.admission(source)[1]:
            self._strangers |= set(self.server._protocols.values()) - before

    def _room_for(self, source: tuple[str, int], trusted: bool) -> bool:
        connections = self.connections()
        self._strangers &= set(connections)
        if len(connections) >= MAX_LINKS:
            return False
        if not trusted and len(self._strangers) >= MAX_LINKS // 2:
            return False
        return sum(_address(c) == source[0] for c in connections) < LINKS_PER_SOURCE

    def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        adapter: Any = writer.transport
        protocol: quic_link.BoundedProtocol = adapter.protocol
        if protocol.joined >= STREAMS_PER_LINK or self.streams >= MAX_STREAMS:
            protocol.end(adapter.stream_id)  # refused: as one connection too many would be
            protocol._quic.reset_stream(adapter.stream_id, 0)
            protocol.transmit()
            return
        protocol.joined += 1
        self.streams += 1
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
            self.streams -= 1

    def close(self) -> None:
        self.server.close()


def _address(protocol: Any) -> str | None:
    paths = protocol._quic._network_paths
    return _plain(paths[0].addr[0]) if paths else None


def _plain(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host
