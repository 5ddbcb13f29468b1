"""One node, wired in one place: the server, the command line, the dashboard and
``import p2prc`` all build ``NodeServices`` and talk to the objects it wires, each with one
job. Nothing here does the work; each object is built on first use (a command that never
talks to a peer never loads what peers need)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from p2prc_core.config import Settings
from p2prc_core.directory import PeerDirectory
from p2prc_core.identity import NodeIdentity
from p2prc_core.own_node import OwnNode
from p2prc_core.peertable import PeerTable
from p2prc_core.plugins import PluginHooks
from p2prc_core.trust import ServerState, TrustStore

if TYPE_CHECKING:  # each imported where it is built: most commands use one or two
    from p2prc_core.exchange import TableExchange
    from p2prc_core.hosting import Hosting
    from p2prc_core.invites import Invites
    from p2prc_core.my_containers import Tracked
    from p2prc_core.on_peers import ContainersOnPeers
    from p2prc_core.tasks import Playbooks, RunService

log = logging.getLogger("p2prc")


class NodeServices:
    """The composition root: this node's settings, home and plugins, and the objects over
    them. Front ends call those objects (``peers``, ``own``, ``on_peers``, ``hosting``,
    ``invites``, ``runs`` ...), never their parts."""

    def __init__(self, settings: Settings, home: Path, hooks: PluginHooks,
                 notice: Callable[[str], None] | None = None):
        self.settings = settings
        self.home = home
        self.hooks = hooks
        self.notice = notice or log.info  # what a user should see (the CLI prints it)
        self.started = time.monotonic()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # as 'p2prc init' makes it

    # -- who this node is ----------------------------------------------------------------------

    @cached_property
    def identity(self) -> NodeIdentity:
        """This node's key, created on first use."""
        return NodeIdentity.load_or_create(self.home)

    @cached_property
    def trust(self) -> TrustStore:
        """The nodes this node trusts."""
        return TrustStore(self.home)

    @cached_property
    def state(self) -> ServerState:
        """Nonces and invites, shared by every worker and the CLI."""
        return ServerState(self.home)

    @cached_property
    def own(self) -> OwnNode:
        """This node's specs, signed record and ``server.json``."""
        return OwnNode(self.settings, self.home, self.hooks, lambda: self.identity,
                       self.hosting.gpu_holders)

    # -- peers ---------------------------------------------------------------------------------

    @cached_property
    def table(self) -> PeerTable:
        s = self.settings
        return PeerTable(self.home, self.identity.node_id, s.allow_loopback, s.max_table_peers,
                         s.max_unverified_peers)

    @cached_property
    def peers(self) -> PeerDirectory:
        """The peers this node knows, and a checked client for each."""
        return PeerDirectory(self.settings, self.hooks, self.identity, self.table, self.trust,
                             self.own.record, self.own.publishes, self.notice,
                             lambda: self.own.served_settings)

    @cached_property
    def exchange(self) -> TableExchange:
        """The server's side of a table exchange (imported here: its HTTP client is heavy,
        and most commands need none)."""
        from p2prc_core.exchange import TableExchange

        s = self.settings
        return TableExchange(self.table, self.own.record, self.home,
                             s.max_records_per_response, s.exchange_newcomers_per_minute)

    @cached_property
    def invites(self) -> Invites:
        from p2prc_core.invites import Invites

        return Invites(self.settings, self.hooks, self.state, self.trust, self.peers,
                       lambda: self.own.served_settings, self.own.record, self.own.publishes)

    # -- containers and runs -------------------------------------------------------------------

    @cached_property
    def hosting(self) -> Hosting:
        """The containers this node hosts for peers."""
        from p2prc_core.hosting import Hosting

        return Hosting(self.settings, self.home, self.hooks, lambda: self.identity.node_id,
                       lambda: self.own.gpus())

    @cached_property
    def tracked(self) -> Tracked:
        """Containers this client started, and groups."""
        from p2prc_core.my_containers import Tracked

        return Tracked(self.home)

    @cached_property
    def on_peers(self) -> ContainersOnPeers:
        """The containers this node started on peers."""
        from p2prc_core.on_peers import ContainersOnPeers

        return ContainersOnPeers(self.settings, self.home, self.peers, self.tracked)

    @cached_property
    def playbooks(self) -> Playbooks:
        from p2prc_core.tasks import Playbooks

        return Playbooks(self.home)

    @cached_property
    def runs(self) -> RunService:
        """Playbooks run on containers, and their history."""
        from p2prc_core.tasks import Runs, RunService

        on_peers = self.on_peers
        return RunService(self.playbooks, self.tracked, Runs(self.home), self.hooks.runners,
                          lambda: on_peers.ssh_key()[0], on_peers.check_alive,
                          on_peers.tunnel_command)
