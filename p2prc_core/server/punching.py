"""``POST /v1/punch``: a caller asks this node to punch a direct UDP path to it (``punch``)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon

from p2prc_core import punch
from p2prc_core.addresses import local_addresses
from p2prc_core.models import Address
from p2prc_core.own_mapping import blocked, mapping_of
from p2prc_core.reach_state import ReachState
from p2prc_core.server.bodies import read_json
from p2prc_core.server.resources import json_answer, send
from p2prc_core.udp_control import send_offer
from p2prc_core.wire import PunchAnswer, PunchOffer, WireError, convert, schema_ref

OFFERS_PER_CALLER = 5  # offers one caller may make in OFFER_WINDOW seconds, in one worker
OFFER_WINDOW = 10.0
STRANGER_CANDIDATES = 2  # candidates of an untrusted caller's offer that are punched toward
MAPPING_WAIT = 1.0  # seconds an offer waits for this port's mapping to be known


def own_candidates(state: dict[str, Any], addresses: list[Address], port: int,
                   allow_loopback: bool, public_only: bool = False) -> list[str]:
    """Where this node's UDP at ``port`` may be met: its mapping as its relay saw it
    (``reach.json``'s ``udp_port``, kept by ``own_mapping``), the public addresses peers saw
    it at with ``port`` (the dial-back's and ``udp``'s; a home router keeps the port,
    mostly), then this machine's own IPv4 addresses (a friend on the same network), at most
    ``punch.MAX_CANDIDATES``; ``public_only``: global addresses only (a stranger learns
    nothing of this host's networks)."""
    found: list[str] = []
    mapped = mapping_of(state)  # the exact mapping of this port, as the relay saw it
    if mapped is not None:
        found.append(punch.candidate_text(*mapped))
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
            (host, _), = punch.parse_candidates([text], allow_loopback)
        except punch.CandidateError:
            continue
        if not public_only or Address.parse(host).kind == "global":
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
                      "429": {"description": "this caller offered 5 times in 10 s, or too many "
                                             "punches run now"},
                      "503": {"description": "this node's UDP port is not served"}},
    }}

    def __init__(self, home: Path, port: int, allow_loopback: bool,
                 is_trusted: Callable[[str], bool],
                 addresses: Callable[[], list[Address]] = local_addresses):
        self.home = home
        self.port = port
        self.allow_loopback = allow_loopback
        self.is_trusted = is_trusted
        self.addresses = addresses
        self._offered: dict[str, list[float]] = {}  # caller -> when it offered lately

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            offer = convert(read_json(req), PunchOffer)
            candidates = punch.parse_candidates(offer.candidates, self.allow_loopback)
        except (WireError, punch.CandidateError) as err:
            raise falcon.HTTPBadRequest(title="Invalid punch offer",
                                        description=str(err)) from None
        caller, now = str(req.context.caller), time.monotonic()
        trusted = self.is_trusted(caller)
        mine = self.addresses()
        candidates = self._usable(candidates, [] if self.allow_loopback else mine, trusted)
        lately = [t for t in self._offered.get(caller, []) if now - t < OFFER_WINDOW]
        if len(lately) >= OFFERS_PER_CALLER:
            raise falcon.HTTPTooManyRequests(
                title="Offered a moment ago",
                description=f"At most {OFFERS_PER_CALLER} punch offers in "
                            f"{OFFER_WINDOW:g} s per caller.")
        if len(self._offered) > 4096:
            self._offered = {c: ts for c, ts in self._offered.items()
                             if now - ts[-1] < OFFER_WINDOW}
        self._offered[caller] = lately + [now]
        state = ReachState(self.home).read()
        if blocked(state):
            raise falcon.HTTPServiceUnavailable(
                title="No UDP here", description="This node's UDP does not reach its relay "
                                                 "(a firewall, or a router that drops it): "
                                                 "use its relay.")
        if not state.get("relay") and not own_candidates(
                state, mine, self.port, self.allow_loopback, public_only=not trusted):
            raise _nothing_to_offer()  # and none will come: no relay to learn it from
        taken = send_offer(self.home, bytes.fromhex(offer.token), candidates, trusted)
        if taken is None:
            raise falcon.HTTPServiceUnavailable(
                title="No UDP here", description="This node does not serve UDP at its "
                                                 "p2prc port now: use its relay.")
        if taken == "full":
            raise falcon.HTTPTooManyRequests(
                title="Too many punches", description="This node punches as many paths as "
                                                      "it will at once: use its relay.")
        state = self._mapped_state()
        ours = own_candidates(state, mine, self.port, self.allow_loopback,
                              public_only=not trusted)
        if not ours:
            raise _nothing_to_offer()
        send(resp, PunchAnswer(candidates=ours, seconds=punch.SECONDS))

    @staticmethod
    def _usable(candidates: list[tuple[str, int]], mine: list[Address],
                trusted: bool) -> list[tuple[str, int]]:
        """The candidates this node punches toward: never itself (its addresses ``mine``;
        none where the config allows loopback: a lab on one machine); for a caller it does
        not trust, ``STRANGER_CANDIDATES`` public addresses at most, none in this node's own
        IPv6 networks (it does not send into its own networks for a
        stranger: a friend on its LAN is trusted).

        :raises falcon.HTTPBadRequest: none is left.
        """
        own = {str(a.ip) for a in mine}
        own_nets = {ipaddress.ip_network(f"{a.ip}/64", strict=False) for a in mine
                    if a.version == 6}
        usable = [(host, port) for host, port in candidates if host not in own and
                  (trusted or (Address.parse(host).kind == "global" and
                               not any(Address.parse(host).ip in net for net in own_nets)))]
        if not trusted:
            usable = usable[:STRANGER_CANDIDATES]
        if not usable:
            raise falcon.HTTPBadRequest(
                title="Invalid punch offer",
                description="No candidate this node punches toward: not its own addresses, "
                            "and public addresses only for a caller it does not trust.")
        return usable

    def _mapped_state(self) -> dict[str, Any]:
        """``reach.json``, once it holds this port's mapping as the relay saw it, or after
        ``MAPPING_WAIT`` seconds (a server just started probes its relay at once on an
        offer: ``own_mapping``)."""
        state = ReachState(self.home)
        deadline = time.monotonic() + MAPPING_WAIT
        found = state.read()
        while mapping_of(found) is None and not blocked(found) and found.get("relay") and \
                time.monotonic() < deadline:
            time.sleep(0.05)
            found = state.read()
        return found


def _nothing_to_offer() -> falcon.HTTPServiceUnavailable:
    return falcon.HTTPServiceUnavailable(
        title="No UDP here", description="This node knows no address of its UDP port to "
                                         "offer: use its relay.")
