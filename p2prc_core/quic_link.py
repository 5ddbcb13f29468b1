"""QUIC on a punched path (issue 24): the client's side, and what both sides share.

A ``QuicLink`` is one QUIC connection to a node, made from the UDP socket that punched the
path, run on an event loop of its own thread. The node presents its own certificate (the
one its TLS port presents, self-signed by its node key); TLS 1.3 proves it holds that key,
and the link checks that the key is the node's it meant to reach before it opens a stream,
as the TLS channel does (``tls.check_peer``).

Each stream stands in for one TCP connection to the node's p2prc port: ``open_socket``
gives a connected socket, so everything that runs over TCP (the API, with its own TLS
inside; tunnels; exec streams) runs over a stream unchanged, and the host joins each stream
to its own server, as it does a relayed client (``udp_endpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from p2prc_core import tls
from p2prc_core.errors import PeerError
from p2prc_core.identity import node_id_for

log = logging.getLogger("p2prc.udp")

ALPN = "p2prc/1"
IDLE_SECONDS = 30.0  # a path silent this long is dead (NATs forget UDP in 30 s or more)
PING_SECONDS = 10.0  # the client keeps the path and its NAT mappings alive
SEND_AHEAD = 4 << 20  # bytes one stream may have sent and not yet acknowledged
READ_AHEAD = 16 << 20  # bytes one stream may have received and not yet passed on
CHUNK = 1 << 16
# QUIC's packets: aioquic's default is the least every path carries (1,200 bytes), and each
# packet costs Python time at both ends. 1,350 (as Chrome's QUIC long used) fits paths with
# an MTU of 1,400 and more, IPv6 and PPPoE included; 12% fewer packets for a transfer.
DATAGRAM_SIZE = 1350


_RUNNING: set[asyncio.Task[Any]] = set()  # asyncio holds tasks weakly: these are held here


def keep(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """A task of the running loop, held until it ends (a task nobody holds may be
    collected midway, its stream cut)."""
    task = asyncio.get_running_loop().create_task(coro)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


def configuration(is_client: bool, cert: str | None = None,
                  key: str | None = None) -> QuicConfiguration:
    config = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN],
                               idle_timeout=IDLE_SECONDS, verify_mode=ssl.CERT_NONE,
                               max_datagram_frame_size=None,
                               max_datagram_size=DATAGRAM_SIZE)
    if cert and key:
        config.load_cert_chain(cert, key)
    return config


class BoundedProtocol(QuicConnectionProtocol):
    """aioquic's protocol, with the bounds aioquic lacks (it grants the sender more credit
    as data arrives, not as it is read): a stream whose reader holds over ``READ_AHEAD``
    bytes unread is stopped (its reader cannot keep up); a stream nobody reads any more
    (``end``) is stopped too, and what still comes for it is dropped. A stream the peer
    reset ends for its reader (aioquic's protocol leaves it waiting)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ended: set[int] = set()
        self.joined = 0  # streams joined to a socket now

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._quic.receive_datagram(data, addr, now=self._loop.time())  # type: ignore[arg-type]
        self._process_events()
        self._transmit_soon()  # once for every datagram of one read (``read_in_batches``)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamReset):  # the peer gave up on it, or refused it
            reader = self._stream_readers.get(event.stream_id)
            if reader is not None:
                reader.feed_eof()
            return
        if isinstance(event, events.StreamDataReceived):
            if event.stream_id in self.ended:
                return
            reader = self._stream_readers.get(event.stream_id)
            if reader is not None and \
                    len(reader._buffer) + len(event.data) > READ_AHEAD:  # type: ignore[attr-defined]
                self.end(event.stream_id)
                reader.feed_eof()  # its join ends: the stream is cut, not grown
                return
        super().quic_event_received(event)

    def end(self, stream_id: int) -> None:
        """Nobody reads ``stream_id`` from now on: the peer is asked to stop sending on it
        (unless it has finished), and its reader is let go."""
        if stream_id in self.ended:
            return
        if len(self.ended) >= 1024:  # a long-lived link: forget the streams aioquic forgot
            self.ended &= set(self._quic._streams)
        self.ended.add(stream_id)
        self._stream_readers.pop(stream_id, None)
        stream = self._quic._streams.get(stream_id)
        if stream is not None and not stream.receiver.is_finished:
            with contextlib.suppress(Exception):  # a stream that ended meanwhile
                self._quic.stop_stream(stream_id, 0)
                self.transmit()


def read_in_batches(sock: socket.socket, protocol: asyncio.DatagramProtocol,
                    most: int = 64) -> None:
    """Have the running loop read ``sock`` (a datagram endpoint's, for ``protocol``) up to
    ``most`` datagrams at each wakeup, not asyncio's one: QUIC then answers a batch of
    packets with one flight (``BoundedProtocol.datagram_received``), not one each, which
    is most of its cost at speed."""
    loop: Any = asyncio.get_running_loop()
    if not hasattr(loop, "_remove_reader"):
        return  # not a selector loop: asyncio's own reading stands
    loop._remove_reader(sock.fileno())  # the transport's, which the public call refuses

    def ready() -> None:
        for _ in range(most):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # an ICMP error for what was sent
                protocol.error_received(err)
                return
            try:
                protocol.datagram_received(data, addr)
            except Exception as err:  # noqa: BLE001 - one datagram, not the batch, is lost
                log.warning("a datagram from %s could not be taken: %r", addr[0], err)

    loop._add_reader(sock.fileno(), ready)  # the transport removes it when it closes


def presented_node(protocol: QuicConnectionProtocol) -> str | None:
    """The node id of the key the other side's certificate holds (its handshake proved it
    holds that key), or None where there is no such certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = getattr(protocol._quic.tls, "_peer_certificate", None)
    if cert is None:
        return None
    key = tls.certificate_key(cert.public_bytes(Encoding.DER))
    return node_id_for(key) if key is not None else None


async def quic_write(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write to a QUIC stream, then wait while more than ``SEND_AHEAD`` of it is not yet
    acknowledged (aioquic's streams buffer without end, and never pause a writer)."""
    writer.write(data)
    adapter: Any = writer.transport
    stream = adapter.protocol._quic._streams.get(adapter.stream_id)
    while stream is not None and len(stream.sender._buffer) > SEND_AHEAD and \
            not adapter.protocol._closed.is_set():
        await asyncio.sleep(0.002)


async def join(quic: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               other: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Carry bytes both ways between a QUIC stream and a socket's streams until both ends
    have finished sending (each end's EOF is passed on), or either breaks."""
    async def copy(source: asyncio.StreamReader, write: Callable[[bytes], Awaitable[None]],
                   sink: asyncio.StreamWriter) -> None:
        while data := await source.read(CHUNK):
            await write(data)
        if sink.can_write_eof():
            sink.write_eof()

    async def to_socket(data: bytes) -> None:
        other[1].write(data)
        await other[1].drain()

    tasks = [asyncio.ensure_future(copy(quic[0], to_socket, other[1])),
             asyncio.ensure_future(copy(other[0], lambda d: quic_write(quic[1], d), quic[1]))]
    adapter: Any = quic[1].transport
    try:
        for task in asyncio.as_completed(tasks):
            await task  # either way's failure ends both
    except (ConnectionError, OSError, ValueError):  # ValueError: the far end reset it
        pass
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in (quic, other):
            with contextlib.suppress(Exception):  # finished, reset, or the loop gone
                writer.close()
        if isinstance(adapter.protocol, BoundedProtocol):
            adapter.protocol.end(adapter.stream_id)


class QuicLink:
    """One QUIC connection to node ``node_id`` at ``remote``, from ``sock`` (see the
    module's docstring). ``connect`` before ``open_socket``; ``close`` when done."""

    def __init__(self, sock: socket.socket, remote: tuple[str, int], node_id: str):
        self.sock = sock
        self.remote = remote
        self.node_id = node_id
        self._loop = asyncio.new_event_loop()
        self._protocol: QuicConnectionProtocol | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="p2prc-quic",
                                        daemon=True)
        self._thread.start()

    def connect(self, timeout: float) -> None:
        """The handshake, and the node checked.

        :raises PeerError: no answer within ``timeout``, or another node answered.
        """
        future = asyncio.run_coroutine_threadsafe(self._connect(timeout), self._loop)
        try:
            future.result(timeout + 1)
        except PeerError:
            self.close()
            raise
        except BaseException as err:  # noqa: BLE001 - said as one error
            self.close()
            raise PeerError(f"QUIC to {self.node_id} at {self.remote[0]}:{self.remote[1]} "
                            f"did not start: {str(err) or type(err).__name__}") from None

    async def _connect(self, timeout: float) -> None:
        protocol = BoundedProtocol(QuicConnection(configuration=configuration(True)))
        await self._loop.create_datagram_endpoint(lambda: protocol, sock=self.sock)
        read_in_batches(self.sock, protocol)
        remote = self.remote
        if self.sock.family == socket.AF_INET6 and ":" not in remote[0]:
            remote = (f"::ffff:{remote[0]}", remote[1])
        protocol.connect(remote)
        self._protocol = protocol
        await asyncio.wait_for(protocol.wait_connected(), timeout)
        presented = presented_node(protocol)
        if presented != self.node_id:
            raise tls.NodeMismatch(f"{remote[0]}:{remote[1]} (punched)", self.node_id,
                                   presented or "none")
        keep(self._keep_alive(protocol))

    async def _keep_alive(self, protocol: QuicConnectionProtocol) -> None:
        with contextlib.suppress(Exception):
            while not protocol._closed.is_set():
                await asyncio.sleep(PING_SECONDS)
                await asyncio.wait_for(protocol.ping(), IDLE_SECONDS)

    @property
    def alive(self) -> bool:
        return self._protocol is not None and not self._protocol._closed.is_set() and \
            self._loop.is_running()

    def open_socket(self, timeout: float = 5.0) -> socket.socket:
        """A new stream, as a connected socket (one end of a socket pair, the other joined
        to the stream on the link's thread).

        :raises PeerError: the link is closed.
        """
        if not self.alive:
            raise PeerError(f"the punched path to {self.node_id} is closed")
        ours, theirs = socket.socketpair()
        ours.settimeout(timeout)  # as a TCP connection's: a silent peer is noticed
        future = asyncio.run_coroutine_threadsafe(self._stream(theirs), self._loop)
        try:
            future.result(timeout)
        except BaseException as err:  # noqa: BLE001 - said as one error
            ours.close()
            theirs.close()
            raise PeerError(f"the punched path to {self.node_id} took no stream: "
                            f"{str(err) or type(err).__name__}") from None
        return ours

    async def _stream(self, theirs: socket.socket) -> None:
        assert self._protocol is not None
        quic = await self._protocol.create_stream()
        # aioquic counts a stream as taken at its first write: take its id now, or the next
        # stream opened before this one writes would get the same id.
        self._protocol._quic.send_stream_data(quic[1].get_extra_info("stream_id"), b"")
        other = await asyncio.open_connection(sock=theirs)
        keep(join(quic, other))

    def close(self) -> None:
        """Close the connection (the node is told) and every stream of it, then the loop."""
        if self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(2)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(2)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    async def _shutdown(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol.transmit()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
