"""The p2prc port's UDP, on the host: probes, punches and QUIC on one socket (issue 24).

One server worker at a time owns the socket (``UdpOwner``, a lock in the home; the others
wait their turn): each QUIC connection's datagrams must reach the one process that holds
it. What arrives is told apart by its first bytes:

- a UDP probe (``udp_probe.MAGIC``): answered, as ``udp_probe.Responder`` says; or the
  answer to this node's own probe of its relay (``own_mapping``);
- a punch packet (``punch.MAGIC``) with the token of an offer this node took: its source is
  admitted for QUIC (at most ``SOURCES_PER_OFFER`` sources for one offer), and the packet
  goes back (at most ``punch.ANSWERS_PER_TOKEN`` times);
- anything else is QUIC, within ``quic_server.QuicSide``'s bounds; its streams are joined
  to this node's own server, as a relayed client's are.

Offers reach the owner from any worker (``POST /v1/punch``) over ``udp_control``. At most
``MAX_OFFERS`` are live at once, strangers' at most half of them, and of those one toward a
given address (a stranger cannot make this node knock at a third party's door for long);
only a trusted caller's offer gets the spread (hundreds of packets to its router's ports,
``punch.punch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from p2prc_core import punch, quic_link, udp_control, udp_probe
from p2prc_core.identity import NodeIdentity
from p2prc_core.own_mapping import OwnMapping
from p2prc_core.quic_server import Budget, QuicSide

log = logging.getLogger("p2prc.udp")

OFFER_SECONDS = 10.0  # an offer's token admits a source this long after it came
MAX_OFFERS = 32  # offers live at once (strangers' at most half)
SOURCES_PER_OFFER = 4  # addresses one offer's token may admit
MAX_SPREADING = 2  # offers whose spread (punch.SPREAD_SOCKETS sockets each) runs at once


class _Offer:
    def __init__(self, candidates: list[tuple[str, int]], until: float, trusted: bool):
        self.candidates = candidates
        self.until = until
        self.trusted = trusted  # a trusted caller's: it may have the spread
        self.answered = 0
        self.sources: set[tuple[str, int]] = set()  # the addresses it admitted
        self.met = False  # a punch packet of its came


class UdpEndpoint(asyncio.DatagramProtocol):
    """What the owner runs on the UDP socket (see the module's docstring), and the offers
    it took."""

    def __init__(self, identity: NodeIdentity, cert: str, key: str, window: float,
                 local: tuple[str, int]):
        self.responder = udp_probe.Responder(identity, window)
        self.local = local
        self.offers: dict[bytes, _Offer] = {}
        self.admitted: dict[tuple[str, int], tuple[float, bool]] = {}  # -> until, trusted
        self.spreading = 0  # offers whose spread runs now
        self.budget = Budget()  # the links and streams of all this node's QUIC
        self._cert, self._key = cert, key
        self.transport: asyncio.DatagramTransport | None = None
        self.quic: QuicSide | None = None
        self.mapping: OwnMapping | None = None  # see ``learn_mapping``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.quic = self.quic_side(self.transport)  # type: ignore[arg-type]

    def learn_mapping(self, home: Path, identity: NodeIdentity) -> None:
        """Keep ``reach.json``'s ``udp_port`` (``own_mapping``), from now on."""
        def send(data: bytes, host: str, port: int) -> None:
            if self.transport is not None:
                with contextlib.suppress(OSError):
                    self.transport.sendto(data, _target(self.transport, host, port))

        self.mapping = OwnMapping(home, identity, send)
        quic_link.keep(self.mapping.run())

    def quic_side(self, transport: asyncio.DatagramTransport,
                  only: set[tuple[str, int]] | None = None) -> QuicSide:
        """QUIC on ``transport``, within this node's one budget; ``only``: the sources it
        may take (a spread socket's: those its own offer admitted)."""
        def admission(source: tuple[str, int]) -> tuple[bool, bool]:
            admitted, trusted = self.admission(source)
            return admitted and (only is None or source in only), trusted

        return QuicSide(transport, self._cert, self._key, self.local, admission, self.budget)

    def admission(self, source: tuple[str, int]) -> tuple[bool, bool]:
        """Whether a live offer admitted ``source``, and whether a trusted caller's did."""
        until, trusted = self.admitted.get(source, (0.0, False))
        return until >= time.monotonic(), trusted

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None and self.quic is not None
        if data[:4] == udp_probe.MAGIC:
            if len(data) == udp_probe.ANSWER_SIZE and self.mapping is not None:
                self.mapping.answered(data, (punch.plain_host(addr[0]), addr[1]))
                return
            answer = self.responder.answer(data, addr[0], addr[1], time.time())
            if answer is not None:
                self.transport.sendto(answer, addr)
            return
        token = punch.token_of(data)
        if token is not None:
            if self.punched(token, (punch.plain_host(addr[0]), addr[1])):
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
        if source not in offer.sources:
            if len(offer.sources) >= SOURCES_PER_OFFER:
                return False  # one token does not open a path for the world
            offer.sources.add(source)
        offer.met = True
        until, trusted = self.admitted.get(source, (0.0, False))
        self.admitted[source] = (max(until, offer.until), trusted or offer.trusted)
        offer.answered += 1
        return offer.answered <= punch.ANSWERS_PER_TOKEN

    def offer(self, taken: udp_control.Offer) -> bool:
        """Take an offer (token, candidates, trusted): admit its token, and punch toward
        its candidates; False when too many are live (strangers': half of them)."""
        token, candidates, trusted = taken
        now = time.monotonic()
        for token_gone in [t for t, o in self.offers.items() if o.until < now]:
            del self.offers[token_gone]
        for source in [s for s, (until, _) in self.admitted.items() if until < now]:
            del self.admitted[source]
        strangers = [o for o in self.offers.values() if not o.trusted]
        aimed = {host for o in strangers for host, _ in o.candidates}
        if token in self.offers or len(self.offers) >= MAX_OFFERS or (not trusted and (
                len(strangers) >= MAX_OFFERS // 2 or
                any(host in aimed for host, _ in candidates))):
            return False  # (strangers: one live offer toward an address, from anyone)
        offer = _Offer(candidates, now + OFFER_SECONDS, trusted)
        self.offers[token] = offer
        if self.mapping is not None and not self.mapping.known:
            self.mapping.now()  # the caller is told where to aim as soon as it is known
        quic_link.keep(self._punch(token, offer))
        return True

    async def _punch(self, token: bytes, offer: _Offer) -> None:
        """Punch toward the offer's candidates; after ``punch.SPREAD_AFTER`` seconds
        unmet, the spread (``punch.punch`` says why) for a trusted caller's offer, unless
        ``MAX_SPREADING`` run."""
        out = punch.packet(token)
        started = time.monotonic()
        deadline = started + punch.SECONDS
        spread: Spread | None = None
        sprayed: list[tuple[str, int]] = []
        try:
            while not offer.met and time.monotonic() < deadline and self.transport:
                if spread is None and offer.trusted and self.spreading < MAX_SPREADING \
                        and time.monotonic() - started >= punch.SPREAD_AFTER:
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
                    not self.spread.endpoint.punched(token, (punch.plain_host(addr[0]), addr[1])):
                return
            if self.spread.winner in (None, self):
                self.spread.winner = self
                self.transport.sendto(data, addr)
                if self.quic is None:
                    self.quic = self.spread.endpoint.quic_side(self.transport,
                                                               self.spread.offer.sources)
                    quic_link.keep(self._close_when_idle())
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
            self.quic.close()
        elif self.transport is not None:
            self.transport.close()
        self.transport = None


def _target(transport: asyncio.DatagramTransport, host: str, port: int) -> tuple[str, int]:
    sock = transport.get_extra_info("socket")
    return punch.aimed(sock.family if sock is not None else socket.AF_INET, host, port)


class UdpOwner:
    """In each worker: wait for the home's UDP lock; the worker holding it serves the UDP
    socket (``UdpEndpoint``) on an event loop of its own thread, until the process ends."""

    def __init__(self, sock: socket.socket, home: Path, identity: NodeIdentity,
                 cert: Path, key: Path, window: float, local: tuple[str, int],
                 allow_loopback: bool):
        self.sock = sock
        self.home = home
        self.identity = identity
        self.endpoint = UdpEndpoint(identity, str(cert), str(key), window, local)
        self.allow_loopback = allow_loopback
        self.control: Any = None  # udp_control's server, once serving

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="p2prc-udp", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        fd = os.open(self.home / "udp.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop))
        except Exception:  # noqa: BLE001 - the server runs on, over TCP and its relay
            log.exception("UDP at the p2prc port is not served: no probes, no punching")
            return
        loop.run_forever()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        await loop.create_datagram_endpoint(lambda: self.endpoint, sock=self.sock)
        quic_link.read_in_batches(self.sock, self.endpoint)
        self.endpoint.learn_mapping(self.home, self.identity)
        self.control = await udp_control.serve(self.home, self.endpoint.offer,
                                               self.allow_loopback)
        if self.control is None:
            log.warning("UDP: another process holds this home's offer socket: punching "
                        "is off (is a second server running for %s?)", self.home)
