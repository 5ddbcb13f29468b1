"""Addresses: this machine's, the ones this node advertises, and the order to dial a peer's
(the dial ladder)."""

from __future__ import annotations

import os
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2prc_core.models import Address, Endpoint, parse_path

if TYPE_CHECKING:  # types only: the tunnel helper imports this module, and must start fast
    from p2prc_core.config import Settings
    from p2prc_core.peertable import PeerEntry, PeerTable
    from p2prc_core.plugins import PluginHooks

# (kind, IP version) -> rank: lower is better. Kinds not listed are never chosen. The
# built-in address plugin chooses by this; 'p2prc interfaces' explains with it.
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
         "multicast": "multicast address", "metadata": "a cloud metadata service",
         "broadcast": "the broadcast address"}


def rank(address: Address) -> tuple[int, str] | None:
    """The default rank of ``address`` (lower is better) and why, or ``None`` if it is never
    chosen."""
    return _RANKS.get((address.kind, address.version))


def explain(address: Address) -> str:
    """Why the default rule ranks ``address`` as it does."""
    ranked = rank(address)
    return ranked[1] if ranked else "never chosen: " + NEVER.get(address.kind, address.kind)


def local_addresses() -> list[Address]:
    """Every IP address on this machine's interfaces (netifaces), IPv6 first. An interface
    that vanishes while it is read (Docker's veths come and go) is skipped."""
    import netifaces

    found: list[Address] = []
    for iface in netifaces.interfaces():
        try:
            entries = netifaces.ifaddresses(iface)
        except (ValueError, OSError):
            continue  # gone since interfaces() listed it
        for family in (socket.AF_INET6, socket.AF_INET):
            for entry in entries.get(family, []):
                try:
                    found.append(Address.parse(entry["addr"], iface))
                except (KeyError, ValueError):
                    continue
    return found


# Bridges that container engines and VM managers make: their addresses reach this machine's
# guests, never this machine from outside.
_GUEST_BRIDGES = ("docker", "br-", "veth", "p2prc0", "virbr", "cni", "flannel", "lxcbr",
                  "lxdbr", "podman")


def guest_bridge(interface: str | None) -> bool:
    return bool(interface) and str(interface).startswith(_GUEST_BRIDGES)


def interfaces_down() -> set[str]:
    """Names of the interfaces the system reports down (none when it cannot tell)."""
    try:
        import psutil

        return {name for name, stats in psutil.net_if_stats().items() if not stats.isup}
    except (ImportError, OSError):
        return set()


def why_not_advertised(address: Address, down: set[str]) -> str | None:
    """Why an address of this machine is not advertised whatever it is, or None."""
    if guest_bridge(address.interface):
        return "never chosen: a container or VM bridge (only this machine's guests reach it)"
    if address.interface in down:
        return "never chosen: its interface is down"
    return None


def advertisable(addresses: list[Address], settings: Settings) -> list[Address]:
    """Drop what is never advertised: loopback unless the config allows it, container and
    VM bridges (docker0, br-..., p2prc0, virbr0), and interfaces that are down."""
    down = interfaces_down()
    return [a for a in addresses if a.usable(settings.allow_loopback)
            and why_not_advertised(a, down) is None]


def default_gateway() -> str | None:
    """The IPv4 default route's gateway (where NAT-PMP and PCP are asked), or None."""
    route = default_routes().get(socket.AF_INET)
    return route[0] if route else None


def default_routes() -> dict[int, tuple[str, str]]:
    """The default routes, by address family: (gateway, interface) each; empty where this
    machine has none, or where it cannot tell."""
    try:
        import netifaces

        defaults = netifaces.gateways().get("default")
    except (AttributeError, OSError, ValueError):
        return {}
    if not isinstance(defaults, dict):
        return {}
    return {family: (str(route[0]), str(route[1])) for family, route in defaults.items()
            if isinstance(route, tuple) and len(route) > 1}


def routed_interfaces() -> set[str] | None:
    """The interfaces that carry a default route; None where this machine has none, or
    where it cannot tell (then nothing is left out for want of one)."""
    return {interface for _, interface in default_routes().values()} or None


def why_peers_cannot_use(address: Address, routed: set[str] | None,
                         reached: Collection[str]) -> str | None:
    """Why peers could hardly use ``address``, or None: a private address on a virtual
    interface with no default route (a lab's bridge, a VPN's), where no peer reached this
    node lately. Kept: a global address, one a peer reached us at, loopback (allowed for a
    lab), an address on a network card (the LAN of a laptop whose VPN takes the default
    route), and everything on a machine with no default route at all."""
    if routed is None or address.kind in ("global", "loopback") or \
            address.interface in routed or str(address) in reached or \
            _network_card(address.interface):
        return None
    return (f"not advertised: a virtual interface ({address.interface}) with no default "
            f"route, and no peer reached this node there lately")


def _network_card(interface: str | None) -> bool:
    """Whether ``interface`` is a device (Linux lists a card's under /sys/class/net/NAME/
    device; bridges, tunnels, veths and dummies have none)."""
    return bool(interface) and "/" not in str(interface) and \
        os.path.exists(f"/sys/class/net/{interface}/device")


def peer_usable(addresses: list[Address], reached: Collection[str]) -> list[Address]:
    """``addresses`` less those peers could hardly use (``why_peers_cannot_use``)."""
    routed = routed_interfaces()
    return [a for a in addresses if why_peers_cannot_use(a, routed, reached) is None]


def ordered_by_preference(hooks: PluginHooks, candidates: list[Address],
                          purpose: str) -> list[Address]:
    """Ask ``p2prc_select_address`` again and again to put all ``candidates`` in order."""
    left = list(dict.fromkeys(candidates))
    ordered: list[Address] = []
    while left:
        choice = hooks.select_address(left, purpose)
        if choice is None or choice not in left:
            break
        ordered.append(choice)
        left.remove(choice)
    return ordered


def dial_order(hooks: PluginHooks, addresses: list[Address]) -> list[Address]:
    """A peer's addresses in the order to dial them (IPv6 first, by default)."""
    return ordered_by_preference(hooks, addresses, "dial") or addresses


def dial_endpoints(hooks: PluginHooks | None, addresses: list[Address], port: int,
                   remembered: str | None = None,
                   node_id: str | None = None,
                   relays: list[Endpoint] | None = None) -> list[Endpoint]:
    """The one rule for where to dial a peer (the dial ladder): its addresses in
    ``p2prc_select_address``'s order (IPv6 first, by default), the endpoint that answered
    last time if it is not among them (an address the peer does not know it has, behind
    NAT, say), then the relays its record names; a relay that answered last time goes first
    (the peer could not be dialled directly then). Each endpoint expects ``node_id`` to
    answer there. ``hooks=None``: the addresses in the record's own order (a light process
    that loads no plugins: the tunnel helper)."""
    ordered = addresses if hooks is None else dial_order(hooks, addresses)
    found = [Endpoint(str(a), port, node_id) for a in ordered]
    if node_id is not None:
        found += [relay.through(node_id) for relay in relays or []
                  if relay.node_id not in (None, node_id)]
    if remembered:
        try:
            endpoint = parse_path(remembered, node_id)
        except ValueError:
            return found
        if endpoint.relay and endpoint in found:
            found.remove(endpoint)
            found.insert(0, endpoint)
        elif not endpoint.relay and endpoint not in found:
            found.append(endpoint)
    return found


def table_endpoints(hooks: PluginHooks | None, table: PeerTable, entry: PeerEntry,
                    hub: Endpoint | None = None) -> list[Endpoint]:
    """Where to dial a peer of the table, in order (``dial_endpoints`` of its record and of
    what answered last); a peer that waits at this node's own relay hub (``hub``: this
    node's server as this machine dials it) is reached through the hub, not at the address
    its record gives for us, which this machine may not be able to dial."""
    found = dial_endpoints(hooks, table.dial_addresses(entry.record), entry.port,
                           entry.measured.address, entry.node_id, table.relays(entry.record))
    if hub is not None and hub.node_id is not None:
        found = list(dict.fromkeys(hub.through(entry.node_id) if e.relay == hub.node_id
                                   else e for e in found))
    return found


def own_server(settings: Settings) -> tuple[str, int]:
    """Where this machine dials this node's own server: loopback where it listens on every
    address (a server bound to ``::`` takes IPv4 too)."""
    host = settings.host
    if host in ("", "::", "0.0.0.0"):
        host = "127.0.0.1"
    return host, settings.port


def advertised_addresses(settings: Settings, hooks: PluginHooks,
                         reached: Collection[str] = ()) -> list[str]:
    """What this node tells others: ``advertise_addresses`` if set, else the interface
    addresses peers could use (``reached``: those peers reached it at lately) in the order
    ``p2prc_select_address`` prefers."""
    if settings.advertise_addresses:
        return [str(Address.parse(a)) for a in settings.advertise_addresses]
    found = peer_usable(advertisable(local_addresses(), settings), reached)
    return [str(a) for a in ordered_by_preference(hooks, found, "advertise")]


@dataclass(frozen=True)
class AddressRow:
    """One local address, as ``p2prc interfaces`` shows it: whether it is advertised, its
    rank among those that could be, and why."""

    interface: str | None
    address: str
    version: int
    kind: str
    advertised: bool
    preference: int | None
    why: str


def address_report(settings: Settings, hooks: PluginHooks, reached: Collection[str] = ()
                   ) -> tuple[Address | None, list[AddressRow]]:
    """Every local address, and the one this node advertises first (``advertise_addresses``
    overrides what the interfaces offer). ``reached``: where peers reached it lately."""
    found = local_addresses()
    routed = routed_interfaces()
    usable = [a for a in advertisable(found, settings)
              if why_peers_cannot_use(a, routed, reached) is None]
    order = ordered_by_preference(hooks, usable, "advertise")
    chosen = order[0] if order else None
    if settings.advertise_addresses:
        chosen = Address.parse(settings.advertise_addresses[0])
    down = interfaces_down()

    def why(address: Address) -> str:
        excluded = why_not_advertised(address, down)
        if excluded is not None:
            return excluded
        if address.kind == "loopback" and not settings.allow_loopback:
            return "never chosen: loopback (set allow_loopback = true for a lab)"
        return why_peers_cannot_use(address, routed, reached) or explain(address)

    return chosen, [AddressRow(a.interface, str(a), a.version, a.kind, a == chosen,
                               order.index(a) + 1 if a in order else None, why(a))
                    for a in found]
