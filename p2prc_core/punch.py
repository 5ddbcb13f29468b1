"""UDP hole punching (issue 24): two nodes behind NATs open a direct UDP path to each other.

The two agree over a channel they already share (the relay's: ``POST /v1/punch``, signed):
the client offers a token and where its UDP comes from (its candidates); the host answers
with its own, and both send small punch packets at each other's candidates at once. Each
side's packets open its own NAT for the other's; the first packet that arrives with the
token says where the other really is. QUIC then runs on that path (``quic_link``).

A punch packet is ``MAGIC`` and the 16-byte token, no more: it carries nothing a stranger
could use, and a host sends them only to the candidates of an offer it took, a bounded
number of times. The token admits the path, not the caller: the host's QUIC takes a new
connection only from an address that sent it a live token's punch.
"""

from __future__ import annotations

import re
import secrets
import select
import socket
import time

from p2prc_core.models import Address

MAGIC = b"P2H1"
TOKEN_BYTES = 16
PACKET_SIZE = len(MAGIC) + TOKEN_BYTES
MAX_CANDIDATES = 8  # addresses one side may offer
EVERY = 0.05  # seconds between two rounds of punch packets
SECONDS = 2.0  # how long each side keeps punching
ANSWERS_PER_TOKEN = 40  # punch packets a host sends back for one token, at most
SPREAD_AFTER = 0.5  # seconds of plain punching before the spread (for a symmetric NAT)
SPREAD_SOCKETS = 256  # sockets each side adds in a spread: new mappings on a symmetric NAT
SPREAD_PORTS = 1024  # random ports of the other side's address each side sends to
SPREAD_BATCH = 64  # of those, sent each round (every EVERY seconds)
_RANDOM = secrets.SystemRandom()
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only ("²".isdigit() is true)


class CandidateError(ValueError):
    """A candidate list that cannot be used; the text says why."""


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def packet(token: bytes) -> bytes:
    return MAGIC + token


def token_of(data: bytes) -> bytes | None:
    """The token of a punch packet, or None for any other bytes."""
    if len(data) != PACKET_SIZE or not data.startswith(MAGIC):
        return None
    return data[len(MAGIC):]


def candidate_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_candidates(items: object, allow_loopback: bool = False) -> list[tuple[str, int]]:
    """Candidates as a peer sent them (``"a.b.c.d:port"`` or ``"[v6]:port"``), checked: at
    most ``MAX_CANDIDATES``, each an IP address p2prc may dial (never loopback unless the
    config allows it, link-local, multicast, broadcast, unspecified or a cloud metadata
    address) and a port from 1 to 65535, none twice.

    :raises CandidateError: the list breaks a rule; its text names the first broken.
    """
    if not isinstance(items, list) or not items:
        raise CandidateError("candidates must be a non-empty list of ADDRESS:PORT")
    if len(items) > MAX_CANDIDATES:
        raise CandidateError(f"at most {MAX_CANDIDATES} candidates, not {len(items)}")
    found: list[tuple[str, int]] = []
    for item in items:
        if not isinstance(item, str) or len(item) > 64:
            raise CandidateError("a candidate is ADDRESS:PORT, at most 64 characters")
        host, sep, port_text = item.rpartition(":")
        if not sep or not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise CandidateError(f"{item!r} is not ADDRESS:PORT with a port from 1 to 65535")
        if host.startswith("[") != host.endswith("]") or \
                (":" in host and not host.startswith("[")):
            raise CandidateError(f"{item!r}: an IPv6 address goes in brackets")
        host = host.strip("[]") if host.startswith("[") else host
        try:
            address = Address.parse(host)
        except ValueError:
            raise CandidateError(f"{item!r}: not an IP address") from None
        if "%" in host or "[" in host or not address.usable(allow_loopback):
            raise CandidateError(f"{item!r}: {address.kind} addresses are never punched")
        pair = (str(address.ip), int(port_text))
        if pair in found:
            raise CandidateError(f"{item!r} is named twice")
        found.append(pair)
    return found


def spread_ports(count: int = SPREAD_PORTS) -> list[int]:
    """``count`` distinct random ports above 1023, where a symmetric NAT maps from."""
    return _RANDOM.sample(range(1024, 65536), count)


def spread_target(candidates: list[tuple[str, int]]) -> str | None:
    """The address a spread goes to: the first public IPv4 address among ``candidates``
    (the other side's router); None where there is none (a LAN is never sprayed)."""
    for host, _ in candidates:
        address = Address.parse(host)
        if address.version == 4 and address.kind == "global":
            return host
    return None


def punch(sock: socket.socket, candidates: list[tuple[str, int]], token: bytes,
          seconds: float = SECONDS, every: float = EVERY,
          spread: bool = True) -> tuple[socket.socket, tuple[str, int]] | None:
    """Send punch packets to every candidate from ``sock`` until one carrying ``token``
    comes back; the socket it came to and the address it came from (where the other side
    really is), or None after ``seconds``.

    After ``SPREAD_AFTER`` seconds without one (a NAT on the way maps per destination), the
    spread, as the other side does it too (``udp_endpoint``): ``SPREAD_SOCKETS`` more
    sockets send to the candidates (if this side's NAT is the symmetric one, one of their
    new mappings may be among the ports the other side sprays), and ``sock`` sends to
    ``SPREAD_PORTS`` random ports of the other side's public address (if that side is the
    symmetric one, one may be a mapping of its spread sockets). The winning socket is kept;
    the others are closed."""
    out = packet(token)
    started = time.monotonic()
    deadline = started + seconds
    sockets = [sock]
    sprayed: list[tuple[str, int]] = []
    resend = 0.0
    try:
        while (now := time.monotonic()) < deadline:
            if now >= resend:
                if spread and len(sockets) == 1 and now - started >= SPREAD_AFTER:
                    sockets += _spread_sockets(sock.family)
                    target = spread_target(candidates)
                    sprayed = [(target, p) for p in spread_ports()] if target else []
                for one in sockets:
                    _send(one, out, candidates)
                _send(sock, out, sprayed[:SPREAD_BATCH])
                sprayed = sprayed[SPREAD_BATCH:] + sprayed[:SPREAD_BATCH]
                resend = now + every
            ready = select.select(sockets, [], [], max(0.0, min(resend, deadline) - now))[0]
            for one in ready:
                try:
                    data, source = one.recvfrom(2048)
                except OSError:
                    continue  # an ICMP error for one candidate
                if token_of(data) == token:
                    _send(one, out, [source] * 3)  # so its side learns where we are too
                    sockets.remove(one)
                    return one, (plain_host(source[0]), source[1])
        return None
    finally:
        for one in sockets[1:]:
            one.close()


def _spread_sockets(family: int) -> list[socket.socket]:
    made: list[socket.socket] = []
    try:
        for _ in range(SPREAD_SOCKETS):
            made.append(udp_socket(family))
    except OSError:
        pass  # out of descriptors: spread with what there is
    return made


def _send(sock: socket.socket, data: bytes, targets: list[tuple[str, int]]) -> None:
    for target in targets:
        try:
            sock.sendto(data, aimed(sock.family, *target))
        except OSError:
            pass  # no route to this one now: the others may do


def aimed(family: int, host: str, port: int) -> tuple[str, int]:
    """``host``:``port`` as a socket of ``family`` sends to it (IPv4 from a dual-stack
    socket as ``::ffff:a.b.c.d``)."""
    if family == socket.AF_INET6 and ":" not in host:
        return f"::ffff:{host}", port
    return host, port


def plain_host(host: str) -> str:
    """An address as a dual-stack socket reports it, IPv4 ones without ``::ffff:``."""
    return host[7:] if host.startswith("::ffff:") else host


def udp_socket(family: int = socket.AF_INET) -> socket.socket:
    """A UDP socket bound to an ephemeral port, for one punch and the QUIC after it."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0))
    return sock


def token_from_hex(text: str) -> bytes:
    """:raises CandidateError: not 32 lower-case hex characters."""
    if not isinstance(text, str) or len(text) != 2 * TOKEN_BYTES or \
            text.strip("0123456789abcdef"):
        raise CandidateError(f"a punch token is {2 * TOKEN_BYTES} lower-case hex characters")
    return bytes.fromhex(text)

