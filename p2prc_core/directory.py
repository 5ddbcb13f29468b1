"""The peers this node knows, and how to talk to one: names to nodes, where to dial them,
the pins that bind a node id to an address (trust on first use), a checked client for a
peer, and the table as ``peers ls`` shows it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

from p2prc_core.addresses import own_server
from p2prc_core.config import Settings
from p2prc_core.errors import BadAddress, P2PRCError, PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint, looks_like_address, parse_endpoint, pin_key
from p2prc_core.names import PeerNames
from p2prc_core.peertable import PeerEntry, PeerTable
from p2prc_core.plugins import PluginHooks
from p2prc_core.tls import NodeMismatch
from p2prc_core.trust import TrustStore

if TYPE_CHECKING:  # httpx and what uses it load only where a node talks to peers
    from p2prc_core.client import PeerClient, Transfer
    from p2prc_core.discovery import Discovery, Progress, UpdateSummary
    from p2prc_core.punched import PunchedPaths


def _whole(value: Any) -> int | None:
    """A count or size a peer's record gives: a whole number from 0, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


@dataclass(frozen=True, slots=True)
class PeerRow:
    """A peer as ``peers ls``, the dashboard and ``import p2prc`` show it: its names, the path
    that answered last, what was measured, and what its record says of GPUs, memory and
    CPUs (its own claim, checked for type only)."""

    name: str
    node_id: str
    own_name: str  # the name the peer gave itself
    address: str
    path: str  # direct, punched (met through a relay, reached direct), relay, or -
    relays: tuple[str, ...]
    latency_ms: float | None
    bandwidth_mbps: float | None
    last_seen: float | None
    failures: int
    gpus: tuple[str, ...]
    gpus_free: int
    memory: int | None  # bytes
    cpus: int | None
    trusted: str | None  # the name it is trusted under; None: not trusted
    score: float
    # Whether it would start a container for this node, as it last said (its answer to a
    # signed exchange, a 201 or a 403); None: not known yet. Its word, checked for type.
    can_host: bool | None = None
    can_host_at: float | None = None  # when it said so

    @property
    def reachable(self) -> bool:
        return self.failures == 0 and self.latency_ms is not None

    @property
    def hosting_rank(self) -> int:
        """0: answered last time and said it would host us; 2: said it would not; 1: the
        rest. The best peer to ask for a container is first by this, then by score."""
        if self.can_host is False:
            return 2
        return 0 if self.can_host and self.reachable else 1

    def as_dict(self) -> dict[str, Any]:
        """The row as ``--json`` prints it (every field is a plain value, or a tuple)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in _ROW_FIELDS}


_ROW_FIELDS = dataclasses.fields(PeerRow)


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
        """Where to dial a peer of the table, in order (the dial ladder)."""
        return self.discovery.endpoints(entry)

    def rows(self, with_gpu: bool = False) -> list[PeerRow]:
        """The table, best first: peers that said they would host us before the others
        (``PeerRow.hosting_rank``), each part by ``p2prc_score_peer``. ``with_gpu``: only
        peers with a free GPU."""
        entries = self.table.load()
        trusted = {k: name or k[:8] for k, name in self.trust.names().items()}
        peers = (e.to_peer() for e in entries.values())
        ranked = self.hooks.ranked(p for p in peers if not with_gpu or p.free_gpus > 0)
        from p2prc_core.punched import punched_lately

        direct = punched_lately(self.table.path.parent)
        hub = functools.cache(self._own_hub)  # (read once, and only if a row needs it)
        rows = [self._row(entries[peer.node_id], peer.free_gpus, trusted.get(peer.node_id),
                          score, peer.node_id in direct, hub)
                for peer, score in ranked]
        return sorted(rows, key=lambda row: row.hosting_rank)  # stable: score within each

    def _row(self, entry: PeerEntry, free_gpus: int, trusted: str | None,
             score: float, punched: bool,
             hub: Callable[[], Endpoint | None]) -> PeerRow:
        measured = entry.measured
        endpoints = [] if measured.address else self.discovery.endpoints(entry, hub=hub())
        address = measured.address or (endpoints[0].path if endpoints else "-")
        specs = entry.record.get("specs")
        specs = specs if isinstance(specs, dict) else {}
        gpus = specs.get("gpus")
        return PeerRow(
            name=entry.local_name or entry.name, node_id=entry.node_id, own_name=entry.name,
            address=address,
            path=("punched" if punched else "relay") if address.startswith("relay ") else
            "direct" if measured.address else "-",
            relays=tuple(r.node_id or "" for r in self.table.relays(entry.record)),
            latency_ms=measured.latency_ms, bandwidth_mbps=measured.bandwidth_mbps,
            last_seen=measured.last_seen, failures=measured.failures,
            gpus=tuple(g for g in gpus if isinstance(g, str))[:8]
            if isinstance(gpus, list) else (),
            gpus_free=free_gpus, memory=_whole(specs.get("memory")),
            cpus=_whole(specs.get("cpus")), trusted=trusted, score=round(score, 3),
            can_host=measured.hosts_us, can_host_at=measured.hosts_us_at)

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
