"""The default peer score: lower latency and higher bandwidth score better."""

from __future__ import annotations

import math

from p2prc_core import hookimpl
from p2prc_core.models import KnownPeer

UNREACHABLE = -1_000_000.0


@hookimpl(trylast=True)
def p2prc_score_peer(peer: KnownPeer) -> float:
    """100 at 0 ms, minus one point a millisecond; plus 10 points per tenfold Mbit/s.

    A peer that failed its last contact, or was never measured, scores far below any
    reachable one, so it ranks last whatever other plugins add.
    """
    if not peer.reachable or peer.latency_ms is None:
        return UNREACHABLE - peer.failures
    score = 100.0 - min(peer.latency_ms, 10_000.0)
    if peer.bandwidth_mbps:
        score += 10.0 * math.log10(1.0 + peer.bandwidth_mbps)
    return score
