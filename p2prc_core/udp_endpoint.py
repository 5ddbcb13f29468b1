"""The p2prc port's UDP, on the host: probes, punches and QUIC on one socket (issue 24).

One server worker at a time owns the socket (``UdpOwner``, a lock in the home; the others
wait their turn): each QUIC connection's datagrams must reach the one process that holds
it. What arrives is told apart by its first bytes:

- a UDP probe (``udp_probe.MAGIC``): answered, as ``udp_probe.Responder`` says;
- a punch packet (``punch.MAGIC``) with the token of an offer this node took: its source is
  admitted for QUIC, and a punch packet goes back (at most ``ANSWERS_PER_TOKEN``);
- anything else is QUIC: a new connection only from an admitted source, at most
  ``MAX_LINKS`` at once; its streams are joined to this node's own server, as a relayed
  client's are.

Offers reach the owner from any worker (``POST /v1/punch``, ``send_offer``) over an abstract
Unix socket whose sender must be this user.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header

from p2prc_core import punch, quic_link, udp_probe
from p2prc_core.identity import NodeIdentity

log = logging.getLogger("p2prc.udp")

OFFER_SECONDS = 10.0  # an offer's token admits a source this long after it came
MAX_OFFERS = 32  # offers live at once
MAX_LINKS = 64  # QUIC connections at once, on each socket
MAX_SPREADING = 2  # offers whose spread (punch.SPREAD_SOCKETS sockets each) runs at once
_CONTROL_MAX = 4096  # the largest offer message between workers


def control_name(home: Path) -> bytes:
    """The abstract Unix socket the owner takes offers on (one per home)."""
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:24]
    return b"\0p2prc-udp-" + digest.encode()


def send_offer(home: Path, token: bytes, candidates: list[tuple[str, int]]) -> bool:
    """Hand an offer to the worker that owns the UDP socket; False where none listens."""
    message = json.dumps({"token": token.hex(),
                          "candidates": [list(c) for c in candidates]}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message, control_name(home))
        except OSError:
            return False
    return True


class _Offer:
    def __init__(self, candidates: list[tuple[str, int]], until: float):
        self.candidates = candidates
        self.until = until
        self.answered = 0
        self.met = False  # a punch packet of its came


class QuicSide:
    """aioquic's server on one UDP socket's transport: a new connection only from a source
    ``admitted`` says yes to, at most ``MAX_LINKS`` at once; each stream joined to this
    node's own server at ``local``."""

    def __init__(self, transport: asyncio.DatagramTransport, cert: str, key: str,
                 local: tuple[str, int], admitted: Callable[[tuple[str, int]], bool]):
        self.local = local
        self.admitted = admitted
        self.server = QuicServer(configuration=quic_link.configuration(False, cert, key),
                                 stream_handler=self._stream)
        self.server.connection_made(transport)

    @property
    def links(self) -> int:
        return len(set(self.server._protocols.values()))

    def receive(self, data: bytes, addr: Any) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return
        if header.destination_cid not in self.server._protocols and (
                not self.admitted((_plain(addr[0]), addr[1])) or self.links >= MAX_LINKS):
            return  # a stranger's Initial: no path was agreed with it
        self.server.datagram_received(data, addr)

    def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.get_running_loop().create_task(self._to_server(reader, writer))

    async def _to_server(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            local = await asyncio.wait_for(asyncio.open_connection(*self.local), 5)
        except (OSError, TimeoutError) as err:
            log.warning("a punched stream: our own server does not answer: %s", err)
            writer.close()
            return
        local[1].get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                     socket.TCP_NODELAY, 1)
        await quic_link.join((reader, writer), local)


class UdpEndpoint(asyncio.DatagramProtocol):
    """What the owner runs on the UDP socket (see the module's docstring), and the offers
    it took."""

    def __init__(self, identity: NodeIdentity, cert: str, key: str, window: float,
                 local: tuple[str, int]):
        self.responder = udp_probe.Responder(identity, window)
        self.local = local
        self.offers: dict[bytes, _Offer] = {}
        self.admitted: dict[tuple[str, int], float] = {}  # source -> until
        self.spreading = 0  # offers whose spread runs now
        self._cert, self._key = cert, key
        self.transport: asyncio.DatagramTransport | None = None
        self.quic: QuicSide | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.quic = self.quic_side(self.transport)  # type: ignore[arg-type]

    def quic_side(self, transport: asyncio.DatagramTransport) -> QuicSide:
        return QuicSide(transport, self._cert, self._key, self.local, self.is_admitted)

    def is_admitted(self, source: tuple[str, int]) -> bool:
        return self.admitted.get(source, 0.0) >= time.monotonic()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None and self.quic is not None
        if data[:4] == udp_probe.MAGIC:
            answer = self.responder.answer(data, addr[0], addr[1], time.time())
            if answer is not None:
                self.transport.sendto(answer, addr)
            return
        token = punch.token_of(data)
        if token is not None:
            if self.punched(token, (_plain(addr[0]), addr[1])):
                self.transport.sendto(data, addr)
            return
        if data[:4] != punch.MAGIC:
            self.quic.receive(data, addr)

    def punched(self, token: bytes, source: tuple[str, int]) -> bool:
        """A punch packet with ``token`` came from ``source``: admitted, if its offer is
        live; whether to answer it (the same packet back, at most ``ANSWERS_PER_TOKEN``)."""
        offer = self.offers.get(token)
        now = time.monotonic()
        if offer is None or offer.until < now:
            return False
        offer.met = True
        self.admitted[source] = max(self.admitted.get(source, 0.0), offer.until)
        offer.answered += 1
        return offer.answered <= punch.ANSWERS_PER_TOKEN

    def offer(self, token: bytes, candidates: list[tuple[str, int]]) -> None:
        """Take an offer: admit its token, and punch toward its candidates."""
        now = time.monotonic()
        for token_gone in [t for t, o in self.offers.items() if o.until < now]:
            del self.offers[token_gone]
        for source in [s for s, until in self.admitted.items() if until < now]:
            del self.admitted[source]
        if token in self.offers or len(self.offers) >= MAX_OFFERS:
            return
        offer = _Offer(candidates, now + OFFER_SECONDS)
        self.offers[token] = offer
        asyncio.get_running_loop().create_task(self._punch(token, offer))

    async def _punch(self, token: bytes, offer: _Offer) -> None:
        """Punch toward the offer's candidates; after ``punch.SPREAD_AFTER`` seconds
        unmet, the spread (``punch.punch`` says why), unless ``MAX_SPREADING`` run."""
        out = punch.packet(token)
        started = time.monotonic()
        deadline = started + punch.SECONDS
        spread: Spread | None = None
        sprayed: list[tuple[str, int]] = []
        try:
            while not offer.met and time.monotonic() < deadline and self.transport:
                if spread is None and time.monotonic() - started >= punch.SPREAD_AFTER \
                        and self.spreading < MAX_SPREADING:
                    self.spreading += 1
                    spread = Spread(self, token, offer)
                    await spread.open()
                    router = punch.spread_target(offer.candidates)
                    sprayed = [(router, p) for p in punch.spread_ports()] if router else []
                for host, port in offer.candidates + sprayed[:punch.SPREAD_BATCH]:
                    with contextlib.suppress(OSError):
                        self.transport.sendto(out, _target(self.transport, host, port))
                sprayed = sprayed[punch.SPREAD_BATCH:] + sprayed[:punch.SPREAD_BATCH]
                if spread is not None:
                    spread.send(out)
                await asyncio.sleep(punch.EVERY)
        finally:
            if spread is not None:
                self.spreading -= 1
                spread.close_losers()


class Spread:
    """The spread sockets of one offer: each sends its punch packets, from a port of its
    own (a new mapping on a symmetric NAT). The one a punch packet of the offer reaches
    first wins: QUIC runs on it (``SpreadSocket``) while it has a connection; the others
    close when the punch ends."""

    def __init__(self, endpoint: UdpEndpoint, token: bytes, offer: _Offer):
        self.endpoint = endpoint
        self.token = token
        self.offer = offer
        self.sockets: list[SpreadSocket] = []
        self.winner: SpreadSocket | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(punch.SPREAD_SOCKETS):
            try:
                sock = punch.udp_socket()
                _, protocol = await loop.create_datagram_endpoint(
                    lambda: SpreadSocket(self), sock=sock)
            except OSError:
                break  # out of descriptors: spread with what there is
            self.sockets.append(protocol)

    def send(self, data: bytes) -> None:
        for one in self.sockets:
            one.send(data, self.offer.candidates)

    def close_losers(self) -> None:
        for one in self.sockets:
            if one is not self.winner:
                one.close()
        self.sockets = [self.winner] if self.winner else []


class SpreadSocket(asyncio.DatagramProtocol):
    """One socket of a ``Spread``; QUIC runs on it once it has won, until its connection
    has been gone ``quic_link.IDLE_SECONDS``."""

    def __init__(self, spread: Spread):
        self.spread = spread
        self.transport: asyncio.DatagramTransport | None = None
        self.quic: QuicSide | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, targets: list[tuple[str, int]]) -> None:
        for target in targets:
            if self.transport is not None:
                with contextlib.suppress(OSError):
                    self.transport.sendto(data, target)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.transport is None:
            return
        token = punch.token_of(data)
        if token is not None:
            if token != self.spread.token or \
                    not self.spread.endpoint.punched(token, (addr[0], addr[1])):
                return
            if self.spread.winner in (None, self):
                self.spread.winner = self
                self.transport.sendto(data, addr)
                if self.quic is None:
                    self.quic = self.spread.endpoint.quic_side(self.transport)
                    asyncio.get_running_loop().create_task(self._close_when_idle())
        elif self.quic is not None and data[:4] != punch.MAGIC:
            self.quic.receive(data, addr)

    async def _close_when_idle(self) -> None:
        idle_since = time.monotonic()
        while self.transport is not None:
            await asyncio.sleep(1.0)
            if self.quic is not None and self.quic.links:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > quic_link.IDLE_SECONDS:
                self.close()

    def close(self) -> None:
        if self.quic is not None:
            self.quic.server.close()
        elif self.transport is not None:
            self.transport.close()
        self.transport = None


def take_offer(endpoint: UdpEndpoint, data: bytes, allow_loopback: bool) -> bool:
    """An offer a worker sent (``send_offer``), checked again, handed to ``endpoint``."""
    try:
        message = json.loads(data)
        token = punch.token_from_hex(message["token"])
        candidates = punch.parse_candidates(
            [punch.candidate_text(str(h), int(p)) for h, p in message["candidates"]],
            allow_loopback)
    except (ValueError, KeyError, TypeError):
        return False
    endpoint.offer(token, candidates)
    return True


def _control_socket(home: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(control_name(home))
    return sock


def _plain(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def _target(transport: asyncio.DatagramTransport, host: str, port: int) -> tuple[str, int]:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_INET6 and ":" not in host:
        return f"::ffff:{host}", port
    return host, port


class UdpOwner:
    """In each worker: wait for the home's UDP lock; the worker holding it serves the UDP
    socket (``UdpEndpoint``) on an event loop of its own thread, until the process ends."""

    def __init__(self, sock: socket.socket, home: Path, identity: NodeIdentity,
                 cert: Path, key: Path, window: float, local: tuple[str, int],
                 allow_loopback: bool):
        self.sock = sock
        self.home = home
        self.endpoint = UdpEndpoint(identity, str(cert), str(key), window, local)
        self.allow_loopback = allow_loopback

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="p2prc-udp", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        fd = os.open(self.home / "udp.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends
        try:
            control = _control_socket(self.home)
        except OSError as err:
            log.warning("UDP: cannot take offers to punch (%s): punching is off", err)
            control = None
        loop = asyncio.new_event_loop()
        loop.run_until_complete(self._serve(loop, control))
        loop.run_forever()

    async def _serve(self, loop: asyncio.AbstractEventLoop,
                     control: socket.socket | None) -> None:
        await loop.create_datagram_endpoint(lambda: self.endpoint, sock=self.sock)
        if control is not None:
            loop.add_reader(control.fileno(), self._read_control, control)

    def _read_control(self, control: socket.socket) -> None:
        try:
            data, ancillary, _, _ = control.recvmsg(
                _CONTROL_MAX, socket.CMSG_SPACE(struct.calcsize("3i")))
        except OSError:
            return
        uid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                _, uid, _ = struct.unpack("3i", payload[:struct.calcsize("3i")])
        if uid != os.getuid():
            return  # another user's process: not one of this server's workers
        take_offer(self.endpoint, data, self.allow_loopback)
