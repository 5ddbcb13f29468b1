"""Invites: a one-time token to this node for a friend, its redemption on the host
(``POST /v1/trust/join``), and ``p2prc join`` on the friend's side."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from p2prc_core.addresses import dial_endpoints
from p2prc_core.config import Settings
from p2prc_core.directory import PeerDirectory
from p2prc_core.errors import BadAddress, PeerError, PeerRefused
from p2prc_core.models import Address, Endpoint
from p2prc_core.plugins import PluginHooks
from p2prc_core.text import format_when
from p2prc_core.tls import NodeMismatch
from p2prc_core.trust import (
    Invite,
    ServerState,
    TrustError,
    TrustStore,
    accept_invite,
    checked_name,
    suggested_name,
)
from p2prc_core.wire import JoinAnswer, JoinRequest


class Invites:
    """Makes and redeems invites. ``served`` gives the settings of the server that runs for
    this home (its real port); ``own_record`` is handed to the host on joining only when
    ``publishes`` (a server of ours runs, so the host can dial us back)."""

    def __init__(self, settings: Settings, hooks: PluginHooks, state: ServerState,
                 trust: TrustStore, peers: PeerDirectory, served: Callable[[], Settings],
                 own_record: Callable[[], dict[str, Any]], publishes: Callable[[], bool]):
        self.settings = settings
        self.hooks = hooks
        self.state = state
        self.trust = trust
        self.peers = peers
        self.served = served
        self.own_record = own_record
        self.publishes = publishes

    def create(self, ttl: int, addresses: list[str] | None = None,
               port: int | None = None, name: str = "") -> Invite:
        """A one-time invite to this node, naming its id, where to dial it (``addresses``,
        or what it advertises) and its port. ``name``: what whoever redeems it is trusted
        under here (their own suggestion does not override it).

        :raises BadAddress: an address is not an IP address.
        :raises TrustError: there is no address a friend could dial, or the name breaks
            the rule or is another trusted node's already.
        """
        name = self.trust.users_name("", name)  # "": the node is not known yet
        try:
            # else what the record advertises: with the router's mapped address, and
            # the addresses peers reached this node at
            chosen = [str(Address.parse(a)) for a in addresses] if addresses else \
                [a for a in self.own_record().get("addresses", []) if isinstance(a, str)]
        except ValueError as err:
            raise BadAddress(f"--address: {err}") from None
        if not chosen:
            raise TrustError("this node has no address a friend could dial: pass --address")
        secret, expires = self.state.create_invite(ttl, name)
        served = self.served()
        return Invite(self.peers.identity.node_id, chosen[:8],
                      port or served.advertise_port or served.port, secret, expires)

    def accept(self, caller: str, request: JoinRequest) -> JoinAnswer:
        """The host's side of ``p2prc join``: the caller is trusted from now on, under the
        invite's name, a name given before, or the one it suggests (``accept_invite``)."""
        accept_invite(self.state, self.trust, self.peers.table, caller, request.secret,
                      request.record, request.name)
        return JoinAnswer(trusted=True, node=self.own_record())

    def join(self, token: str, name: str | None = None) -> tuple[dict[str, Any], Endpoint]:
        """Redeem a friend's invite at the first of its addresses that answers: we are
        trusted there, and its node joins our table. ``name``: the name we suggest to be
        known by there (default: this node's name, made to fit the rule; the host may keep
        its own). Returns its record and where it was.

        :raises TrustError: the token is damaged or expired, the name breaks the rule, or
            another node answered.
        :raises PeerError: no address of the inviting node answered.
        """
        offer = Invite.parse(token)
        suggestion = checked_name(name) if name is not None else \
            suggested_name(self.settings.display_name)
        if offer.expires < time.time():
            raise TrustError(f"this invite expired at {format_when(offer.expires)}: ask for a "
                             f"new one")
        candidates = []
        for text in offer.addresses:
            try:
                candidates.append(Address.parse(text))
            except ValueError:
                continue
        failures = []
        # Our record goes along only when a server of ours runs: else the host would keep
        # dialling an address where nothing answers.
        own = self.own_record() if self.publishes() else None
        # The token names the node: only it can answer (TLS), whoever else has the address.
        for endpoint in dial_endpoints(self.hooks, candidates, offer.port,
                                       node_id=offer.node_id):
            endpoint = endpoint.expecting(offer.node_id, named=True)  # pinned on success
            try:
                with self.peers.client(endpoint) as client:
                    record = client.join(offer.secret, own, suggestion).node
            except PeerRefused:
                raise
            except NodeMismatch as err:
                raise TrustError(f"{endpoint} is not the node the invite names "
                                 f"({err.presented} instead of {offer.node_id}): not "
                                 f"joined") from None
            except PeerError as err:
                failures.append(str(err))
                continue
            if record["node_id"] != offer.node_id:
                raise TrustError(f"{endpoint} is not the node the invite names "
                                 f"({record['node_id']} instead of {offer.node_id}): not joined")
            self.peers.add_record(endpoint, record)
            return record, endpoint
        raise PeerError("could not reach the inviting node at any of its addresses: "
                        + "; ".join(failures))
