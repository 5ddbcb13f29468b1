"""``POST /v1/punch``: a caller asks this node to punch a direct UDP path to it (``punch``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon

from p2prc_core import punch
from p2prc_core.addresses import local_addresses
from p2prc_core.models import Address
from p2prc_core.reach_state import ReachState
from p2prc_core.server.bodies import read_json
from p2prc_core.server.resources import json_answer, send
from p2prc_core.udp_endpoint import send_offer
from p2prc_core.wire import PunchAnswer, PunchOffer, WireError, convert, schema_ref

OFFER_EVERY = 2.0  # seconds between two offers of one caller, in one worker


def own_candidates(state: dict[str, Any], addresses: list[Address], port: int,
                   allow_loopback: bool) -> list[str]:
    """Where this node's UDP at ``port`` may be met: the public addresses peers saw it at
    (``reach.json``'s dial-back and ``udp``; a home router keeps the port, mostly), then
    this machine's own IPv4 addresses (a friend on the same network), at most
    ``punch.MAX_CANDIDATES``."""
    found: list[str] = []
    reachable = state.get("reachable")
    if isinstance(reachable, dict) and isinstance(reachable.get("address"), str):
        host = reachable["address"].rpartition(":")[0].strip("[]")  # where a peer saw us
        if host:
            found.append(punch.candidate_text(host, port))
    udp = state.get("udp") if isinstance(state.get("udp"), dict) else None
    seen = udp.get("seen") if udp else None
    for item in seen if isinstance(seen, list) else []:
        if isinstance(item, dict) and isinstance(item.get("address"), str):
            found.append(punch.candidate_text(item["address"], port))
    for address in addresses:
        if address.version == 4:
            found.append(punch.candidate_text(str(address.ip), port))
    usable: list[str] = []
    for text in dict.fromkeys(found):
        try:
            punch.parse_candidates([text], allow_loopback)
        except punch.CandidateError:
            continue
        usable.append(text)
    return usable[:punch.MAX_CANDIDATES]


class PunchResource:
    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Punch a direct UDP path to the caller, for QUIC (hole punching)",
        "tags": ["signed"],
        "requestBody": {"content": {"application/json": {"schema": schema_ref(PunchOffer)}}},
        "responses": {"200": json_answer(PunchAnswer, "where this node's UDP may be met; "
                                                      "it punches toward the caller now"),
                      "400": {"description": "not an offer, or a candidate never punched"},
                      "429": {"description": "this caller offered a moment ago"},
                      "503": {"description": "this node's UDP port is not served"}},
    }}

    def __init__(self, home: Path, port: int, allow_loopback: bool,
                 addresses: Callable[[], list[Address]] = local_addresses):
        self.home = home
        self.port = port
        self.allow_loopback = allow_loopback
        self.addresses = addresses
        self._last: dict[str, float] = {}  # caller -> when it last offered

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            offer = convert(read_json(req), PunchOffer)
            candidates = punch.parse_candidates(offer.candidates, self.allow_loopback)
        except (WireError, punch.CandidateError) as err:
            raise falcon.HTTPBadRequest(title="Invalid punch offer",
                                        description=str(err)) from None
        caller, now = str(req.context.caller), time.monotonic()
        if now - self._last.get(caller, -OFFER_EVERY) < OFFER_EVERY:
            raise falcon.HTTPTooManyRequests(
                title="Offered a moment ago",
                description=f"One punch offer every {OFFER_EVERY:g} s per caller.")
        if len(self._last) > 4096:
            self._last = {c: t for c, t in self._last.items() if now - t < OFFER_EVERY}
        self._last[caller] = now
        ours = own_candidates(ReachState(self.home).read(), self.addresses(), self.port,
                              self.allow_loopback)
        if not ours or not send_offer(self.home, bytes.fromhex(offer.token), candidates):
            raise falcon.HTTPServiceUnavailable(
                title="No UDP here", description="This node does not serve UDP at its "
                                                 "p2prc port now: use its relay.")
        send(resp, PunchAnswer(candidates=ours, seconds=punch.SECONDS))
