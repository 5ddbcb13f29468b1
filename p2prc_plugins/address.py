"""IPv6-first address selection (the rule itself is ``p2prc_core.addresses.rank``)."""

from __future__ import annotations

from collections.abc import Sequence

from p2prc_core import hookimpl
from p2prc_core.addresses import explain, rank
from p2prc_core.models import Address

__all__ = ["explain", "p2prc_select_address", "rank"]


@hookimpl(trylast=True)
def p2prc_select_address(candidates: Sequence[Address], purpose: str) -> Address | None:
    ranked = [(r[0], i, a) for i, a in enumerate(candidates) if (r := rank(a)) is not None]
    return min(ranked)[2] if ranked else None
