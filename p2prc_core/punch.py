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
        if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
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


def punch(sock: socket.socket, candidates: list[tuple[str, int]], token: bytes,
          seconds: float = SECONDS, every: float = EVERY) -> tuple[str, int] | None:
    """Send punch packets to every candidate from ``sock`` until one carrying ``token``
    comes back: the address it came from (where the other side really is), or None after
    ``seconds``. Other datagrams are left unread only if they are not punch packets of
    this token; they are dropped."""
    out = packet(token)
    deadline = time.monotonic() + seconds
    resend = 0.0
    while (now := time.monotonic()) < deadline:
        if now >= resend:
            for target in candidates:
                try:
                    sock.sendto(out, _target(sock, target))
                except OSError:
                    pass  # no route to this one now: the others may do
            resend = now + every
        if not select.select([sock], [], [], max(0.0, min(resend, deadline) - now))[0]:
            continue
        try:
            data, source = sock.recvfrom(2048)
        except OSError:
            continue  # an ICMP error for one candidate
        if token_of(data) == token:
            for _ in range(3):  # so its side learns where we are too, if it missed ours
                try:
                    sock.sendto(out, source)
                except OSError:
                    break
            return _plain(source[0]), source[1]
    return None


def _target(sock: socket.socket, target: tuple[str, int]) -> tuple[str, int]:
    host, port = target
    if sock.family == socket.AF_INET6 and ":" not in host:
        return f"::ffff:{host}", port
    return host, port


def _plain(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def udp_socket(family: int = socket.AF_INET) -> socket.socket:
    """A UDP socket bound to an ephemeral port, for one punch and the QUIC after it."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0))
    return sock


def token_hex(token: bytes) -> str:
    return token.hex()


def token_from_hex(text: str) -> bytes:
    """:raises CandidateError: not 32 lower-case hex characters."""
    if not isinstance(text, str) or len(text) != 2 * TOKEN_BYTES or \
            text.strip("0123456789abcdef"):
        raise CandidateError(f"a punch token is {2 * TOKEN_BYTES} lower-case hex characters")
    return bytes.fromhex(text)

