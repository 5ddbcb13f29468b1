"""Plain data shared by the core and the plugins."""

from __future__ import annotations

import bisect
import functools
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 8088
# The Upgrade token of every stream (relay, tunnel, exec): the client sends it, a 101 names it.
STREAM_PROTOCOL = "p2prc-stream/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA_IP = ipaddress.ip_address("169.254.169.254")
# Cloud metadata services (AWS over IPv6, Alibaba): a table must never make a node dial them.
_METADATA = {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
_ZERO_NET = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"),
          ipaddress.ip_network("::ffff:0:0:0/96"))  # well-known, local-use, SIIT
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
NEVER_DIALLED = ("unspecified", "link-local", "multicast", "metadata", "broadcast")


@dataclass(frozen=True)
class Address:
    """One IP address of a node, with the interface it was found on (if local)."""

    ip: IPAddress
    interface: str | None = None

    @classmethod
    def parse(cls, text: str, interface: str | None = None) -> Address:
        """Parse ``text`` as an IPv4 or IPv6 address; a ``%zone`` suffix is dropped."""
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(ip, interface)

    @property
    def version(self) -> int:
        return self.ip.version

    @functools.cached_property  # (asked several times of each address a table holds)
    def kind(self) -> str:
        """A short word for what sort of address this is (``address_kind``)."""
        return address_kind(self.ip)

    def embedded_ipv4(self) -> Address | None:
        """The IPv4 address inside a NAT64 (64:ff9b::/96, 64:ff9b:1::/48), SIIT
        (::ffff:0:a.b.c.d), 6to4 (2002::/16) or IPv4-compatible (::a.b.c.d) IPv6 address
        (its last 32 bits; 6to4's after the prefix): it reaches that IPv4 host."""
        ip = self.ip
        if not isinstance(ip, ipaddress.IPv6Address):
            return None
        if any(ip in net for net in _NAT64) or (ip in _V4_COMPATIBLE and int(ip) > 1):
            return Address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _SIX_TO_FOUR:
            return Address(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
        return None

    def usable(self, allow_loopback: bool) -> bool:
        """Whether p2prc may advertise or dial it: never unspecified (0.0.0.0/8 included),
        link-local, multicast, broadcast or a cloud metadata address, nor an IPv6 spelling
        of such an IPv4 address; loopback only where the config allows."""
        if self.kind in NEVER_DIALLED:
            return False
        embedded = self.embedded_ipv4()
        if embedded is not None and not embedded.usable(allow_loopback):
            return False
        return allow_loopback or self.kind != "loopback"

    def __str__(self) -> str:
        return str(self.ip)


def _ranges(networks: list[Any]) -> tuple[list[int], list[int]]:
    """``networks`` merged into sorted ranges: their first and last addresses, as ints."""
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks)
    starts: list[int] = []
    ends: list[int] = []
    for start, end in spans:
        if starts and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


def _special() -> dict[int, tuple[list[int], list[int]]]:
    """Per IP version, every range where ``address_kind`` answers anything but "global":
    those it names, and this Python's own lists behind ``is_private`` and ``is_global``.
    Empty where this Python keeps those lists elsewhere (then every address takes the long
    way)."""
    v4 = getattr(getattr(ipaddress, "_IPv4Constants", None), "_private_networks", None)
    v6 = getattr(getattr(ipaddress, "_IPv6Constants", None), "_private_networks", None)
    if not v4 or not v6:
        return {}
    net = ipaddress.ip_network
    return {4: _ranges([*v4, _ZERO_NET, net("127.0.0.0/8"), net("169.254.0.0/16"),
                        net("100.64.0.0/10"), net("224.0.0.0/4"), net("255.255.255.255/32"),
                        *(net(a) for a in _METADATA if a.version == 4)]),
            6: _ranges([*v6, net("::/128"), net("::1/128"), net("fe80::/10"),
                        net("ff00::/8"), _UNIQUE_LOCAL,
                        *(net(a) for a in _METADATA if a.version == 6)])}


def address_kind(ip: IPAddress) -> str:
    """A short word for what sort of address ``ip`` is. Most addresses a table holds are
    global: one that lies outside every special range is told so in one search, without
    ``ipaddress``'s walks through its lists (``kind_by_rules`` gives the same word)."""
    ranges = _SPECIAL.get(ip.version)
    if ranges is not None:
        value = int(ip)
        index = bisect.bisect_right(ranges[0], value) - 1
        if index < 0 or value > ranges[1][index]:
            return "global"
    return kind_by_rules(ip)


def kind_by_rules(ip: IPAddress) -> str:
    """``address_kind`` the long way, by ``ipaddress``'s own tests."""
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _ZERO_NET):
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip == _METADATA_IP:
        return "link-local"
    if ip in _METADATA:
        return "metadata"
    if ip == _BROADCAST:
        return "broadcast"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _UNIQUE_LOCAL:
        return "unique-local"
    if ip.is_private:
        return "private"
    if ip.is_global:
        return "global"
    return "reserved"


_SPECIAL = _special()

@dataclass(frozen=True)
class Endpoint:
    """Where to reach a peer server: a host (IP address or name) and a port, and the node id
    expected there when it is known (it takes no part in comparing endpoints).

    A relayed endpoint (``relay`` set) is a relay's address: the connection goes to the
    relay, whose node id is ``relay``, and through it, end to end, to ``node_id``."""

    host: str
    port: int = DEFAULT_PORT
    node_id: str | None = field(default=None, compare=False)
    # The user named that node here (NODE_ID@ADDRESS, an invite): its pin may be rewritten.
    named: bool = field(default=False, compare=False)
    relay: str | None = None

    def url(self, scheme: str = "https") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def expecting(self, node_id: str | None, named: bool = False) -> Endpoint:
        """The same address, with the node id expected there."""
        return Endpoint(self.host, self.port, node_id, named, self.relay)

    def through(self, node_id: str) -> Endpoint:
        """This relay's address, as a way to reach ``node_id`` (this endpoint names the
        relay's own id)."""
        if self.node_id is None:
            raise ValueError("a relay is used only with its node id known")
        return Endpoint(self.host, self.port, node_id, False, self.node_id)

    @property
    def pin_key(self) -> str:
        """How pins name this address: one spelling for each (IPv4-mapped IPv6 as IPv4,
        IPv6 compressed and lower-case, host names lower-case)."""
        return pin_key(self.host, self.port)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def path(self) -> str:
        """How this endpoint is reached, as ``peers ls`` shows it and the table keeps it:
        ``ADDRESS`` direct, or ``relay RELAY_ID@ADDRESS``."""
        return f"relay {self.relay}@{self.address}" if self.relay else self.address

    def __str__(self) -> str:
        return f"{self.address} (relay)" if self.relay else self.address


def parse_path(text: str, node_id: str | None) -> Endpoint:
    """An ``Endpoint.path`` back to the endpoint that reaches ``node_id``.

    :raises ValueError: it is neither form.
    """
    if text.startswith("relay "):
        if node_id is None:
            raise ValueError("a relayed path is for a known node only")
        return parse_endpoint(text[6:]).through(node_id)
    return parse_endpoint(text).expecting(node_id)


# Each pattern below is used with ``fullmatch`` (``$`` would let a trailing line break in).
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fe80::1%eth0: an interface's name or number


_NODE_ID = re.compile(r"[a-z2-7]{26}")

# What a container is called and how an OpenSSH public key is written: one rule for the host
# that checks a request and the client that checks a reply (use ``fullmatch``).
MIN_PREFIX = 4  # the shortest start of a node's or a container's id taken for it
CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")  # a full id, or a 12+ character prefix
PUBLIC_KEY = re.compile(r"(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) "
                        r"[A-Za-z0-9+/]+={0,3}")
KEY_LINE = re.compile(PUBLIC_KEY.pattern + r"( [ -~]{0,100})?")  # with a comment
LOCAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a user's name for a peer


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> Endpoint:
    """Parse ``[NODE_ID@]ADDRESS[:PORT]``: IPv4, ``[IPv6]:port``, bare IPv6, or a host name;
    with ``NODE_ID@`` in front, the node that must answer there.

    :raises ValueError: with a message that says what is wrong.
    """
    text = text.strip()
    if text.startswith(("http://", "https://")):
        text = text.split("://", 1)[1].rstrip("/")
    node_id, at, rest = text.partition("@")
    if at:
        if "@" in rest:
            raise ValueError(f"{text!r} names more than one node id: write "
                             f"NODE_ID@ADDRESS[:PORT] with one")
        if not _NODE_ID.fullmatch(node_id.lower()):
            raise ValueError(f"{node_id!r} is not a node id (26 letters and digits, as "
                             f"'p2prc id' prints)")
        return parse_endpoint(rest, default_port).expecting(node_id.lower(), named=True)
    if not text:
        raise ValueError("empty address")
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
        _check_ip(host, text)
    elif text.count(":") > 1:
        host = text  # a bare IPv6 address, no port
        _check_ip(host, text)
    else:
        host, sep, port_part = text.partition(":")
        port_text = port_part if sep else None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.fullmatch(host):
                raise ValueError(f"{text!r} is not an IP address or host name") from None
            if re.fullmatch(r"[0-9.]+|0[xX][0-9a-fA-F.]*", host):
                # 127.1, 2130706433, 0x7f000001: other spellings of an IP address, which
                # would dodge the pin on the usual one.
                raise ValueError(f"{text!r}: write an IPv4 address as four numbers, "
                                 f"a.b.c.d") from None
    port = default_port
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    return Endpoint(host, port)


def pin_key(host: str, port: int) -> str:
    try:
        host = str(Address.parse(host))
    except ValueError:
        host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def looks_like_address(text: str) -> bool:
    """Whether PEER text is an address rather than a name: anything with a port, a dot, an
    ``@`` or brackets (``10.0.0.7``, ``nas.lan``, ``localhost:9001``, ``ID@host``), an IPv6
    address, or ``localhost``. Such text is never looked up among names, so a peer cannot
    choose a name that redirects what the user typed as an address; names are single words."""
    text = text.strip()
    return any(mark in text for mark in ":.@[") or text.lower() == "localhost"


def _check_ip(host: str, text: str) -> None:
    address, percent, zone = host.partition("%")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    if percent and not _ZONE.fullmatch(zone):
        raise ValueError(f"{text!r}: {zone!r} after '%' is not an interface's name")


@dataclass
class KnownPeer:
    """What a node knows of a peer, as the scoring hooks see it: the fields of its signed
    record that matter there, and what was measured (not the signed record itself)."""

    node_id: str
    name: str = ""
    addresses: list[str] = field(default_factory=list)
    port: int = DEFAULT_PORT
    latency_ms: float | None = None
    bandwidth_mbps: float | None = None
    failures: int = 0
    specs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        return self.failures == 0 and self.latency_ms is not None

    @property
    def gpu_count(self) -> int:
        gpus = self.specs.get("gpus")
        if isinstance(gpus, int) and not isinstance(gpus, bool):
            return max(0, min(gpus, 64))
        return min(len(gpus), 64) if isinstance(gpus, list) else 0

    @property
    def free_gpus(self) -> int:
        """The GPUs the peer says no container holds now (its record's ``gpus_free``; a
        record that does not say, from an older peer, counts them all)."""
        if "gpus_free" not in self.specs:
            return self.gpu_count
        free = self.specs["gpus_free"]
        if isinstance(free, int) and not isinstance(free, bool):
            return max(0, min(free, self.gpu_count))
        return 0


PeerRecord = KnownPeer  # its name before 0.2, kept for plugins that import it


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``"512"``, ``"64k"``, ``"10M"``, ``"1G"`` to bytes (binary units).

    :raises ValueError: the text is not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 512, 64k, 10M, 1G)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``"90"`` or ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"`` to seconds.

    :raises ValueError: the text is not a duration.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 30m, 2h, 7d)")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


MAX_JSON_DEPTH = 32


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (counted without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from a peer: no NaN or Infinity, and nesting at most ``max_depth`` deep.

    :raises ValueError: anything else (too deep, not JSON, not UTF-8), said plainly.
    """
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err}") from None
    if json_depth(value) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value
