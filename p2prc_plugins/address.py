"""IPv6-first address selection."""

from __future__ import annotations

from collections.abc import Sequence

from p2prc_core import hookimpl
from p2prc_core.models import Address

# (kind, IP version) -> rank: lower is better. Kinds not listed are never chosen.
_RANKS = {
    ("global", 6): (0, "global IPv6 is preferred: reachable without NAT"),
    ("global", 4): (1, "global IPv4: no global IPv6 address"),
    ("unique-local", 6): (2, "unique-local IPv6: no global address"),
    ("private", 6): (2, "private-use IPv6: no global address"),
    ("private", 4): (3, "private IPv4: no global or unique-local address"),
    ("reserved", 6): (4, "reserved-range IPv6: nothing better"),
    ("reserved", 4): (5, "reserved-range IPv4: nothing better"),
    ("loopback", 6): (6, "loopback IPv6: only this machine can reach it"),
    ("loopback", 4): (7, "loopback IPv4: only this machine can reach it"),
}

NEVER = {"unspecified": "unspecified address", "link-local": "link-local: needs an interface zone",
         "multicast": "multicast address"}


def rank(address: Address) -> tuple[int, str] | None:
    """The rank of ``address`` (lower is better) and why, or ``None`` if it is never chosen."""
    return _RANKS.get((address.kind, address.version))


def explain(address: Address) -> str:
    ranked = rank(address)
    return ranked[1] if ranked else "never chosen: " + NEVER.get(address.kind, address.kind)


@hookimpl(trylast=True)
def p2prc_select_address(candidates: Sequence[Address], purpose: str) -> Address | None:
    ranked = [(r[0], i, a) for i, a in enumerate(candidates) if (r := rank(a)) is not None]
    return min(ranked)[2] if ranked else None
