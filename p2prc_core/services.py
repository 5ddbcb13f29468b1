"""One node's services, built in one place: the server and the command line both use
``NodeServices``, so nothing about a node (its record, table, discovery, containers, runs,
trust) is put together twice."""

from __future__ import annotations

import json
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2prc_core import __version__
from p2prc_core.config import Settings
from p2prc_core.containers import Backend, ContainerError, ContainerService
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Address, Endpoint, parse_endpoint
from p2prc_core.node import TimedCache, dial_endpoints, record_fields
from p2prc_core.peertable import PeerEntry, PeerTable
from p2prc_core.plugins import PluginHooks
from p2prc_core.records import RecordPublisher
from p2prc_core.sshkeys import ensure_key
from p2prc_core.tasks import Playbooks, Runs, RunService
from p2prc_core.tracking import Tracked
from p2prc_core.trust import Invite, ServerState, TrustError, TrustStore, accept_invite

if TYPE_CHECKING:  # httpx and what uses it load only where a node talks to peers
    from p2prc_core.client import PeerClient
    from p2prc_core.discovery import Discovery

RECORD_SECONDS = 30.0  # how long a built record is served before it is built again


class NodeServices:
    """This node's objects, each built on first use from its settings, home and plugins."""

    def __init__(self, settings: Settings, home: Path, hooks: PluginHooks):
        self.settings = settings
        self.home = home
        self.hooks = hooks
        self.started = time.monotonic()
        self._specs = TimedCache(self._collect_specs, settings.specs_cache_seconds)
        self._record = TimedCache(self._build_record, RECORD_SECONDS)
        self._containers: ContainerService | None = None

    # -- who this node is ----------------------------------------------------------------------

    @cached_property
    def identity(self) -> NodeIdentity:
        """This node's key, created on first use."""
        return NodeIdentity.load_or_create(self.home)

    @cached_property
    def trust(self) -> TrustStore:
        return TrustStore(self.home)

    @cached_property
    def state(self) -> ServerState:
        """Nonces and invites, shared by every worker and the CLI."""
        return ServerState(self.home)

    def _collect_specs(self) -> tuple[dict[str, Any], bytes]:
        specs = self.hooks.collect_specs()
        return specs, json.dumps(specs).encode()

    def specs(self) -> dict[str, Any]:
        """This machine's specs (cached for ``specs_cache_seconds``)."""
        result: dict[str, Any] = self._specs.get()[0]
        return result

    def specs_json(self) -> bytes:
        result: bytes = self._specs.get()[1]
        return result

    def gpus(self) -> list[Any]:
        gpus = self.specs().get("gpus")
        return gpus if isinstance(gpus, list) else []

    def _build_record(self) -> dict[str, Any]:
        fields = record_fields(self.settings, self.hooks, self.specs(), __version__)
        return RecordPublisher(self.home, self.identity).current(fields)

    def own_record(self) -> dict[str, Any]:
        """This node's signed record, as its server serves it."""
        record: dict[str, Any] = self._record.get()
        return record

    # -- peers ---------------------------------------------------------------------------------

    @cached_property
    def table(self) -> PeerTable:
        s = self.settings
        return PeerTable(self.home, self.identity.node_id, s.allow_loopback, s.max_table_peers)

    @cached_property
    def discovery(self) -> Discovery:
        from p2prc_core.discovery import Discovery, HttpTransport

        s = self.settings
        return Discovery(self.table, self.hooks,
                         HttpTransport(s.request_timeout, s.max_table_bytes), self.own_record,
                         concurrency=s.update_concurrency, probes=s.latency_probes,
                         max_failures=s.peer_max_failures,
                         max_records=s.max_records_per_response)

    def find_peer(self, text: str) -> PeerEntry | None:
        """A table entry by node id or name; None when neither matches.

        :raises P2PRCError: several peers carry that name.
        """
        if not self.table.path.exists():
            return None
        peers = self.table.load()
        if text in peers:
            return peers[text]
        named = [e for e in peers.values() if e.name == text]
        if len(named) > 1:
            ids = ", ".join(e.node_id for e in named)
            raise P2PRCError(f"{len(named)} peers are named {text!r} ({ids}): use a node id")
        return named[0] if named else None

    def resolve(self, peer: str | Endpoint) -> Endpoint:
        """PEER (a node id or a name from the table, or ADDRESS[:PORT]) to the endpoint to
        dial: for a peer in the table, the first of its endpoints that takes a connection.

        :raises ValueError: ``peer`` is neither in the table nor an address.
        :raises PeerError: no endpoint of the peer answers.
        """
        if isinstance(peer, Endpoint):
            return peer
        entry = self.find_peer(peer)
        if entry is None:
            return parse_endpoint(peer)
        endpoints = self.discovery.endpoints(entry)
        if not endpoints:
            raise PeerError(f"{peer}: the table has no address this node may dial")
        from p2prc_core.client import first_reachable

        return first_reachable(endpoints, self.settings.request_timeout)

    def client(self, peer: str | Endpoint) -> PeerClient:
        """A client for PEER that signs with this node's key."""
        from p2prc_core.client import PeerClient

        return PeerClient(self.resolve(peer), timeout=self.settings.request_timeout,
                          identity=self.identity)

    def fetch_record(self, endpoint: Endpoint) -> dict[str, Any]:
        """The verified record of the node at ``endpoint``."""
        with self.client(endpoint) as client:
            return client.node()

    def bootstrap(self) -> None:
        """Add the configured ``bootstrap`` peers the table does not hold yet."""
        self.discovery.bootstrap(self.settings.bootstrap, self.fetch_record)

    def exchange(self, body: Any) -> dict[str, Any]:
        """The server's side of a table exchange (``discovery.handle_exchange``)."""
        from p2prc_core.discovery import handle_exchange

        return handle_exchange(self.table, self.own_record(), body,
                               self.settings.max_records_per_response)

    def table_etag(self) -> str:
        return f"{self.table.snapshot().cursor()}:{self.own_record()['seq']}"

    # -- trust ---------------------------------------------------------------------------------

    def accept_invite(self, caller: str, secret: str, caller_record: Any) -> dict[str, Any]:
        """The host's side of ``p2prc join``: the caller is trusted from now on."""
        accept_invite(self.state, self.trust, self.table, caller, secret, caller_record)
        return {"trusted": True, "node": self.own_record()}

    def join(self, token: str) -> tuple[dict[str, Any], Endpoint]:
        """Redeem a friend's invite at the first of its addresses that answers: we are
        trusted there, and its node joins our table. Returns its record and where it was.

        :raises TrustError: the token is damaged or expired, or another node answered.
        :raises PeerError: no address of the inviting node answered.
        """
        offer = Invite.parse(token)
        if offer.expires < time.time():
            raise TrustError(f"this invite expired at "
                             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(offer.expires))}"
                             f": ask for a new one")
        candidates = []
        for text in offer.addresses:
            try:
                candidates.append(Address.parse(text))
            except ValueError:
                continue
        failures = []
        own = self.own_record()
        for endpoint in dial_endpoints(self.hooks, candidates, offer.port):
            try:
                with self.client(endpoint) as client:
                    record = client.join(offer.secret, own)
            except PeerRefused:
                raise
            except PeerError as err:
                failures.append(str(err))
                continue
            if record["node_id"] != offer.node_id:
                raise TrustError(f"{endpoint} is not the node the invite names "
                                 f"({record['node_id']} instead of {offer.node_id}): not joined")
            self.discovery.add(endpoint, record)
            return record, endpoint
        raise PeerError("could not reach the inviting node at any of its addresses: "
                        + "; ".join(failures))

    # -- containers and runs -------------------------------------------------------------------

    @cached_property
    def backends(self) -> dict[str, Backend]:
        return self.hooks.backends()

    def backend(self) -> Backend:
        """The configured virtualization backend.

        :raises ContainerError: 503 when it is not installed or was disabled.
        """
        backend = self.backends.get(self.settings.backend)
        if backend is None:
            raise ContainerError(503, "No backend",
                                 f"The {self.settings.backend!r} backend is not installed or "
                                 f"was disabled: this host runs no containers.")
        return backend

    def containers(self) -> ContainerService:
        """The host's container service over the configured backend (built on first use)."""
        if self._containers is None:
            self._containers = ContainerService.open(self.settings, self.backend(), self.home,
                                                     self.identity.node_id, self.gpus)
        return self._containers

    def reap(self) -> list[str]:
        """Remove the containers whose lease ran out; none when there is no engine."""
        try:
            return self.containers().reap()
        except ContainerError:
            return []

    def ssh_key(self) -> tuple[Path, str]:
        """The client's SSH key: the private key's path and the public key line."""
        return ensure_key(self.home, self.settings.ssh_key)

    @cached_property
    def tracked(self) -> Tracked:
        """Containers this client started, and groups."""
        return Tracked(self.home)

    @cached_property
    def playbooks(self) -> Playbooks:
        return Playbooks(self.home)

    @cached_property
    def runs(self) -> RunService:
        return RunService(self.playbooks, self.tracked, Runs(self.home), self.hooks.runners,
                          lambda: self.ssh_key()[0])
