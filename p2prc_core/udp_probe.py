"""UDP at the p2prc port, the first step to hole punching (issue 24): a node asks peers where
its UDP comes from, as each sees it, and so learns what its NAT does with UDP, as
``tailscale netcheck`` says: nothing (no NAT), one mapping whatever the destination
(endpoint-independent: a punched path can work), or a mapping per destination (symmetric:
it takes port prediction, or the relay). The TCP counterpart is a table exchange's
``observed`` address.

A probe and its answer are binary, of fixed sizes, each signed by its sender's node key:

    probe  (PROBE_SIZE bytes):  MAGIC, PROBE, the target's node id, the prober's key, time,
                                nonce, zero padding, signature
    answer (ANSWER_SIZE bytes): MAGIC, ANSWER, the probe's nonce, the address and port the
                                probe came from, the answering node's key, signature

A host answers only a whole probe signed for it within its clock window, never with more
bytes than the probe (no amplification), and at most ``RATE`` answers a second to one source
(an IPv4 address or IPv6 /64) in each server worker; a stranger learns nothing but its own
address. The prober
takes an answer only from the address it probed, with its nonce, signed by the node it
meant to ask.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from p2prc_core.identity import NodeIdentity, is_node_id, node_id_for, verify
from p2prc_core.intake import source_prefix

MAGIC = b"P2U1"
PROBE, ANSWER = 1, 2
PROBE_SIZE = 200
_PROBE_SIGNED = 136  # the probe's bytes its signature covers (then the signature)
ANSWER_SIZE = 135
_ANSWER_SIGNED = 71
_PROBE_TAG = b"p2prc-udp-probe-v1\0"
_ANSWER_TAG = b"p2prc-udp-answer-v1\0"
RATE = 10  # answers a second to one source, at most
CHECKS = 200  # signatures checked a second, at most (a flood costs a worker no more)
_SOURCES_KEPT = 4096  # sources counted in one second; more wait for the next


class ProbeError(ValueError):
    """Bytes that are not a probe or answer of this protocol, or not validly signed."""


@dataclass(frozen=True)
class Probe:
    """Where does my UDP come from? Asked of node ``target``."""

    target: str
    key: bytes  # the prober's public key
    time: int
    nonce: bytes

    def signed(self, identity: NodeIdentity) -> bytes:
        if not is_node_id(self.target):
            raise ValueError(f"not a node id: {self.target!r}")
        head = MAGIC + bytes([PROBE]) + self.target.encode("ascii") + self.key + \
            struct.pack(">Q", self.time) + self.nonce
        head += bytes(_PROBE_SIGNED - len(head))
        return head + identity.sign(_PROBE_TAG + head)

    @classmethod
    def read(cls, data: bytes, checked: bool = True) -> Probe:
        """The probe in ``data``; its signature checked unless ``checked`` is False (then
        ``check_signature`` must follow: a host first drops what costs it nothing to drop).

        :raises ProbeError: not a whole probe, or not signed by the key it carries.
        """
        if len(data) != PROBE_SIZE or data[:4] != MAGIC or data[4] != PROBE:
            raise ProbeError("not a probe")
        if any(data[87:_PROBE_SIGNED]):
            raise ProbeError("a probe's padding is not zeros")
        try:
            target = data[5:31].decode("ascii")
        except UnicodeDecodeError:
            raise ProbeError("a probe's target is not a node id") from None
        if checked:
            check_signature(data)
        return cls(target, data[31:63], struct.unpack(">Q", data[63:71])[0], data[71:87])


def check_signature(probe: bytes) -> None:
    """:raises ProbeError: the probe (whole, as ``Probe.read`` took it) is not signed by the
    key it carries."""
    if not verify(probe[31:63], probe[_PROBE_SIGNED:], _PROBE_TAG + probe[:_PROBE_SIGNED]):
        raise ProbeError("a probe not signed by its key")


@dataclass(frozen=True)
class Answer:
    """The address and port a probe came from, as its target saw them."""

    nonce: bytes
    address: str
    port: int
    key: bytes  # the answering node's public key

    def signed(self, identity: NodeIdentity) -> bytes:
        packed = ipaddress.IPv6Address(_as_v6(self.address)).packed
        head = MAGIC + bytes([ANSWER]) + self.nonce + packed + struct.pack(">H", self.port) + \
            self.key
        return head + identity.sign(_ANSWER_TAG + head)

    @classmethod
    def read(cls, data: bytes) -> Answer:
        """:raises ProbeError: not a whole answer, or not signed by the key it carries."""
        if len(data) != ANSWER_SIZE or data[:4] != MAGIC or data[4] != ANSWER:
            raise ProbeError("not an answer")
        key = data[39:71]
        if not verify(key, data[_ANSWER_SIGNED:], _ANSWER_TAG + data[:_ANSWER_SIGNED]):
            raise ProbeError("an answer not signed by its key")
        address = ipaddress.IPv6Address(data[21:37])
        shown = str(address.ipv4_mapped or address)
        return cls(data[5:21], shown, struct.unpack(">H", data[37:39])[0], key)


def _as_v6(address: str) -> str:
    parsed = ipaddress.ip_address(address.split("%")[0])
    return f"::ffff:{parsed}" if parsed.version == 4 else str(parsed)


def bind(host: str, port: int) -> socket.socket | None:
    """The server's UDP socket at ``host``:``port`` (``::`` takes IPv4 too), or None where
    it cannot be had (the server runs on, over TCP: it says why in its log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:  # no IPv6 in this kernel: the socket cannot even be made
        return bind("0.0.0.0", port) if host == "::" else None
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        return bind("0.0.0.0", port) if host == "::" else None
    sock.set_inheritable(True)
    return sock


class Responder:
    """Answers probes that reach the server's UDP socket at its p2prc port (the owner of
    that socket, ``udp_endpoint.UdpEndpoint``, hands them over)."""

    def __init__(self, identity: NodeIdentity, window: float, rate: int = RATE):
        self.identity = identity
        self.window = window
        self.rate = rate
        self._second = -1  # the second counted now
        self._counts: dict[str, int] = {}  # source -> answers in it
        self._checks = 0  # signatures checked in it

    def answer(self, data: bytes, source: str, port: int, now: float) -> bytes | None:
        """The answer to ``data`` from ``source``:``port``; None for anything else (not a
        probe, not for this node, out of the clock window, over the rate)."""
        try:  # what costs nothing to check first; a signature's check last
            probe = Probe.read(data, checked=False)
            if probe.target != self.identity.node_id or abs(probe.time - now) > self.window:
                return None
            # One source: an IPv4 address, or an IPv6 /64.
            if not self._allowed(source_prefix(source, ipv6_bits=64, ipv4_bits=32),
                                 int(now)):
                return None
            self._checks += 1
            check_signature(data)
        except ProbeError:
            return None
        answer = Answer(probe.nonce, source, port, self.identity.public_key).signed(
            self.identity)
        return answer if len(answer) <= len(data) else None

    def _allowed(self, source: str, second: int) -> bool:
        """One more answer to ``source`` this second: within its rate, with room in this
        second's table for a source new to it, and within the second's signature checks."""
        if second != self._second:
            self._second, self._counts, self._checks = second, {}, 0
        count = self._counts.get(source, 0)
        if count >= self.rate or self._checks >= CHECKS or \
                (not count and len(self._counts) >= _SOURCES_KEPT):
            return False
        self._counts[source] = count + 1
        return True


@dataclass(frozen=True)
class Seen:
    """What one peer saw of this node's UDP."""

    node_id: str
    address: str
    port: int


def ask(targets: Iterable[tuple[str, int, str]], identity: NodeIdentity,
        timeout: float = 1.5, every: float = 0.3,
        sock: socket.socket | None = None) -> tuple[int, list[Seen]]:
    """Probe each target (address, port, node id) from one socket, again every ``every``
    seconds for ``timeout`` (a probe or its answer may be lost): this socket's port, and
    what each target that answered saw. IPv4 targets only (NAT is IPv4's). ``sock``: an
    IPv4 UDP socket of the caller's to ask from (a punch's), left open; else one of its
    own. It returns as soon as every target answered."""
    waiting: dict[tuple[str, int], list[Waiting]] = {}  # several records may name one
    for address, port, node_id in targets:
        nonce = os.urandom(16)
        probe = Probe(node_id, identity.public_key, int(time.time()), nonce).signed(identity)
        waiting.setdefault((address, port), []).append((node_id, nonce, probe))
    seen: list[Seen] = []
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
    with sock if own else contextlib.nullcontext(sock):
        local_port = sock.getsockname()[1]
        deadline = time.monotonic() + timeout
        resend = 0.0
        while waiting and time.monotonic() < deadline:
            if time.monotonic() >= resend:
                for target, probes in waiting.items():
                    for _, _, probe in probes:
                        try:
                            sock.sendto(probe, target)
                        except OSError:
                            pass  # no route now: the next round, or no answer
                resend = time.monotonic() + every
            wait = max(0.0, min(resend, deadline) - time.monotonic())
            if not select.select([sock], [], [], wait)[0]:
                continue
            try:
                data, source = sock.recvfrom(ANSWER_SIZE + 1)
            except OSError:
                continue  # an ICMP error for one target: the others may still answer
            key = (source[0], source[1])
            found = _accepted(data, waiting.get(key, []))
            if found is not None:
                seen.append(found[0])
                waiting[key].remove(found[1])
                if not waiting[key]:
                    del waiting[key]
    return local_port, seen


Waiting = tuple[str, bytes, bytes]  # a probe sent: the node asked, its nonce, its bytes


def _accepted(data: bytes, expected: list[Waiting]) -> tuple[Seen, Waiting] | None:
    """The answer in ``data`` (from where the probes ``expected`` went), when it has one's
    nonce and is signed by the node that one asked; and that probe. Else None."""
    try:
        answer = Answer.read(data)
    except ProbeError:
        return None
    for probe in expected:
        node_id, nonce, _ = probe
        if answer.nonce == nonce and node_id_for(answer.key) == node_id:
            return Seen(node_id, answer.address, answer.port), probe
    return None


KINDS = ("none", "endpoint-independent", "symmetric", "blocked", "unknown")


@dataclass(frozen=True)
class Mapping:
    """What this node's NAT does with UDP, with the reason in words."""

    kind: str  # one of KINDS
    detail: str


def classify(local_addresses: set[str], local_port: int, asked: int,
             seen: list[Seen]) -> Mapping:
    """What ``seen`` (from ``asked`` peers, probed from ``local_port``) says of the NAT."""
    if not asked:
        return Mapping("unknown", "no peer with an IPv4 address to ask over UDP")
    if not seen:
        return Mapping("blocked", f"none of {asked} peer(s) answered over UDP: UDP is blocked "
                                  f"on the way, or their p2prc servers are older")
    shown = ", ".join(f"{s.address}:{s.port}" for s in seen)
    # A peer on the same network (or a machine with several addresses, no NAT) sees one of
    # this machine's own addresses and the port: that says nothing of a NAT beyond it.
    own = {(address, local_port) for address in local_addresses}
    outside = Counter((s.address, s.port) for s in seen if (s.address, s.port) not in own)
    if not outside:
        return Mapping("none", f"peers see this node's own address and port ({shown})")
    answered = sum(outside.values())
    if answered < 2:
        return Mapping("unknown", f"one peer beyond this network answered ({shown}): it "
                                  f"takes two to tell")
    agreeing = outside.most_common(1)[0][1]
    if agreeing * 2 > answered:  # most agree: one that does not is wrong, or lies
        return Mapping("endpoint-independent",
                       f"{agreeing} of {answered} peers see one mapping ({shown}): a "
                       f"punched path can work")
    return Mapping("symmetric", f"peers see another mapping each ({shown}): the NAT maps "
                                f"each destination anew")
