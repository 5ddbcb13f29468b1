"""The peers this node knows, and how to talk to one: names to nodes, where to dial them,
the pins that bind a node id to an address (trust on first use), a checked client for a
peer, and the table as ``peers ls`` shows it."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

from p2prc_core.addresses import own_server, table_endpoints
from p2prc_core.config import Settings
from p2prc_core.errors import BadAddress, P2PRCError, PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint, looks_like_address, parse_endpoint, pin_key
from p2prc_core.names import PeerNames
from p2prc_core.peer_listing import PeerListing, PeerRow
from p2prc_core.peertable import PeerEntry, PeerTable
from p2prc_core.plugins import PluginHooks
from p2prc_core.tls import NodeMismatch
from p2prc_core.trust import TrustStore

if TYPE_CHECKING:  # httpx and what uses it load only where a node talks to peers
    from p2prc_core.client import PeerClient, Transfer
    from p2prc_core.discovery import Discovery, Progress, UpdateSummary
    from p2prc_core.punched import PunchedPaths


class PeerDirectory:
    """The peer table, names, pins and clients of one node. ``own_record`` is this node's
    signed record (what an exchange hands over); ``publishes`` says whether a server of this
    node runs (else it is not handed to peers as one to dial), ``served`` its settings (its
    port); ``notice`` tells the user of a first contact or a moved pin."""

    def __init__(self, settings: Settings, hooks: PluginHooks, identity: NodeIdentity,
                 table: PeerTable, trust: TrustStore, own_record: Callable[[], dict[str, Any]],
                 publishes: Callable[[], bool], notice: Callable[[str], None],
                 served: Callable[[], Settings] | None = None):
        self.settings = settings
        self.hooks = hooks
        self.identity = identity
        self.table = table
        self.trust = trust
        self.own_record = own_record
        self.publishes = publishes
        self.notice = notice
        # the settings of the server that runs for this home (its port), when one does
        self.served = served or (lambda: settings)
        self.names = PeerNames(table, trust)

    @property
    def secure(self) -> bool:
        """TLS between peers (``transport = "tls"``, the default)."""
        return self.settings.transport == "tls"

    @cached_property
    def discovery(self) -> Discovery:
        from p2prc_core.discovery import Discovery, HttpTransport

        s = self.settings
        discovery = Discovery(self.table, self.hooks,
                              HttpTransport(s.request_timeout, s.max_table_bytes, self.secure,
                                            self.identity),
                              self.own_record,
                              concurrency=s.update_concurrency, probes=s.latency_probes,
                              max_failures=s.peer_max_failures,
                              max_records=s.max_records_per_response,
                              newcomers_per_peer=s.exchange_newcomers_per_minute,
                              peer_budget=s.peer_time_budget, fanout=s.update_fanout)
        discovery.publish = self.publishes
        discovery.hub = self._own_hub
        return discovery

    def _own_hub(self) -> Endpoint | None:
        """This node's own server (and relay hub), as this machine dials it: a peer that
        waits at it is reached through it, not at the address its record gives for us (which
        this machine may not be able to dial)."""
        if not self.publishes():
            return None
        host, port = own_server(self.served())
        return Endpoint(host, port, self.identity.node_id)

    # -- reading the table ---------------------------------------------------------------------

    def entries(self) -> dict[str, PeerEntry]:
        """The table's peers by node id (none before the table exists)."""
        return self.table.load() if self.table.path.exists() else {}

    def find(self, text: str) -> PeerEntry | None:
        """A table entry for PEER (``PeerNames.find``)."""
        return self.names.find(text)

    def node_id_of(self, text: str) -> str:
        """NODE as a node id (``PeerNames.node_id_of``)."""
        return self.names.node_id_of(text)

    def endpoints(self, entry: PeerEntry) -> list[Endpoint]:
        """Where to dial a peer of the table, in order (the dial ladder; no discovery is
        made for it, nor its HTTP client loaded)."""
        return table_endpoints(self.hooks, self.table, entry, self._own_hub())

    @cached_property
    def listing(self) -> PeerListing:
        """The table as it is listed, best first (kept in the home once it is long)."""
        return PeerListing(self.table, self.trust, self.hooks,
                           lambda entry, hub: table_endpoints(self.hooks, self.table, entry,
                                                              hub),
                           self._own_hub)

    def rows(self, with_gpu: bool = False) -> list[PeerRow]:
        """The table, best first (``PeerListing.rows``). ``with_gpu``: only peers with a
        free GPU."""
        return self.listing.rows(with_gpu)

    # -- where to dial, and whom to expect -----------------------------------------------------

    def resolve(self, peer: str | Endpoint) -> list[Endpoint]:
        """PEER (a node id or a name from the table, NODE_ID@ADDRESS[:PORT], or
        ADDRESS[:PORT]) to where to dial it, each endpoint with the node id expected there:
        a peer from the table at its addresses in dial order; a bare address with the node
        pinned there, if one is (none on first contact).

        :raises UnknownPeer: a single word that names no peer.
        :raises BadAddress: ``peer`` is neither in the table nor an address.
        :raises PeerError: the table has no address of the peer this node may dial.
        """
        if isinstance(peer, Endpoint):
            endpoint = peer
        else:
            entry = self.names.find(peer)
            if entry is not None:
                endpoints = self.discovery.endpoints(entry)
                if not endpoints:
                    raise PeerError(f"{peer}: the table has no address this node may dial")
                return endpoints
            if peer.strip() and not looks_like_address(peer):  # a name, and no host name
                raise self.names.unknown(peer)
            try:
                endpoint = parse_endpoint(peer)
            except ValueError as err:
                raise BadAddress(str(err)) from None
        if endpoint.node_id is None:
            endpoint = endpoint.expecting(self.pinned(endpoint))
        return [endpoint]

    def pinned(self, endpoint: Endpoint, *also: str) -> str | None:
        """The node id this node has seen answer at ``endpoint`` (trust on first use), by
        its one spelling (``pin_key``), or at any of the ``also`` pin keys."""
        if not self.table.path.exists():
            return None
        state = self.table.snapshot()
        for key in (endpoint.pin_key, *also):
            if key in state.pins:
                return state.pins[key]
        found = {e.node_id for e in state.peers.values()
                 if e.measured.address and e.measured.address in (endpoint.path, *also)}
        return found.pop() if len(found) == 1 else None

    def _contact(self, endpoint: Endpoint, presented: str, peer_ip: str | None,
                 pin: bool = True) -> None:
        """A TLS channel opened. On first contact at ``endpoint`` (however its address was
        written, and whatever name it was dialled by), refuse a node other than the one
        pinned at the IP address actually reached; otherwise pin the node that answered and
        say so. Pins change only there, or where the user named the node (NODE_ID@, an
        invite); a peer reached through the table never moves another node's pin.
        ``pin=False``: check the same, pin nothing (a read).

        :raises NodeMismatch: another node is pinned at the address reached.
        """
        if endpoint.node_id is not None and not endpoint.named:
            return
        keys = [endpoint.pin_key]
        if peer_ip is not None:
            keys.append(pin_key(peer_ip, endpoint.port))
        pinned = self.pinned(endpoint, *keys[1:])
        if endpoint.node_id is None and pinned is not None and pinned != presented:
            raise NodeMismatch(endpoint, pinned, presented)
        if not pin or pinned == presented or presented == self.identity.node_id:
            return
        self.table.pin(list(dict.fromkeys(keys)), presented)
        if endpoint.node_id is None:
            self.notice(f"first contact with {endpoint}: node {presented} (pinned: another "
                        f"key there will be refused)")
        elif pinned is not None:
            self.notice(f"{endpoint} is now pinned to node {presented} (was {pinned})")

    def client(self, peer: str | Endpoint | list[Endpoint], pin: bool = True) -> PeerClient:
        """A client for PEER (or for the paths given) over a checked channel, signing with
        this node's key. ``pin=False`` for a read that must change nothing (the dashboard's
        pages): a node other than the one pinned is refused all the same, and a first
        contact pins nothing."""
        from p2prc_core.client import PeerClient

        paths = peer if isinstance(peer, list) else self.resolve(peer)
        contact = partial(self._contact, pin=pin)
        return PeerClient(paths, timeout=self.settings.request_timeout,
                          identity=self.identity, secure=self.secure,
                          on_contact=contact if self.secure else None,
                          paths=self.punched)

    @cached_property
    def punched(self) -> PunchedPaths | None:
        """Punched paths to nodes met through their relays (``punch = true``)."""
        if not self.settings.punch:
            return None
        from p2prc_core import punched

        return punched.use(punched.PunchedPaths(self.table.path.parent, self.identity,
                                                self.secure, self.settings.allow_loopback))

    # -- changing the table --------------------------------------------------------------------

    def fetch_record(self, endpoint: Endpoint) -> dict[str, Any]:
        """The verified record of the node at ``endpoint``."""
        with self.client(endpoint) as client:
            return client.node()

    def add(self, peer: str | Endpoint,
            local_name: str | None = None) -> tuple[PeerEntry, UpdateSummary, Endpoint]:
        """Add the node at ``peer`` (ADDRESS[:PORT], or NODE_ID@ADDRESS[:PORT]) to the
        table, exchange tables with it and measure it; returns its entry, what the exchange
        brought, and the endpoint it was added at. ``local_name`` is the user's own name for
        it (taken from any peer that had it).

        :raises P2PRCError: it is this node, or it cannot be reached.
        """
        with self.client(peer) as client:
            record = client.node()
            endpoint = client.endpoint
        if record["node_id"] == self.identity.node_id:
            raise P2PRCError(f"{endpoint} is this node itself")
        summary = self.discovery.add(endpoint, record)
        if local_name:
            self.table.name(record["node_id"], local_name)
        return self.table.load()[record["node_id"]], summary, endpoint

    def add_record(self, endpoint: Endpoint, record: dict[str, Any]) -> UpdateSummary:
        """Add a node whose verified record came another way (an invite), and exchange."""
        return self.discovery.add(endpoint, record)

    def update(self, hops: int, progress: Progress | None = None,
               only: list[str] | None = None) -> UpdateSummary:
        """Ask the peers (``only`` these node ids, if given) for theirs, ``hops`` rounds
        out, and measure them."""
        return self.discovery.update(hops, progress, only=only)

    def bootstrap(self) -> None:
        """Add the configured ``bootstrap`` peers the table does not hold yet."""
        self.discovery.bootstrap(self.settings.bootstrap, self.fetch_record)

    def forget(self, node_id: str) -> bool:
        """Drop a peer from the table; False when it held none by that id."""
        return self.table.forget(node_id)

    def remember_hosting(self, node_id: str | None, hosts_us: bool) -> None:
        """A peer answered our container request: 201 (``hosts_us``) or 403 (not); shown by
        ``peers ls`` and preferred (or not) as the best peer from now on."""
        if node_id is not None and self.table.path.exists():
            self.table.remember_hosting(node_id, hosts_us)

    def speedtest(self, peer: str, size: int, download_only: bool = False,
                  progress: Callable[[str, int], Callable[[int], None]] | None = None
                  ) -> tuple[Endpoint, list[Transfer]]:
        """Download (and upload) ``size`` bytes to PEER; a peer from the table remembers
        the download's bandwidth. ``progress(direction, total)`` returns what to call with
        each count of bytes moved."""
        results: list[Transfer] = []
        with self.client(peer) as client:
            steps = [("download", client.download)]
            if not download_only:
                steps.append(("upload", client.upload))
            for direction, move in steps:
                advance = progress(direction, size) if progress else None
                results.append(move(size, advance))
            endpoint = client.endpoint
        entry = self.names.find(peer)
        if entry is not None:
            self.table.record_bandwidth(entry.node_id, results[0].mbit_per_second)
        return endpoint, results
