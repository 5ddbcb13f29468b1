"""Containers this node started on peers: start one (``touch``), ask how they stand, remove
them, and reach their ports through the host's p2prc port (tunnels and forwards)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2prc_core.config import Settings
from p2prc_core.directory import PeerDirectory
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused, Refusal, RelayRefused
from p2prc_core.models import Endpoint, parse_path
from p2prc_core.my_containers import RemoteContainer, Tracked
from p2prc_core.sshkeys import ensure_key
from p2prc_core.wire import ContainerRequest, WireError, convert

Gpus = bool | int | list[int] | tuple[int, ...]  # none or all, a count, or the host's indexes


class ContainersOnPeers:
    """The client's side of containers: ``tracked`` keeps what it started (and groups)."""

    def __init__(self, settings: Settings, home: Path, peers: PeerDirectory, tracked: Tracked):
        self.settings = settings
        self.home = home
        self.peers = peers
        self.tracked = tracked

    def ssh_key(self) -> tuple[Path, str]:
        """The client's SSH key: the private key's path and the public key line."""
        return ensure_key(self.home, self.settings.ssh_key)

    def touch(self, peer: str, *, ports: int = 0, gpu: Gpus = False,
              image: str | None = None, cpus: float | None = None, memory: int | None = None,
              ttl: int | None = None) -> RemoteContainer:
        """Start a container on PEER with our SSH key and what else was asked (``memory`` in
        bytes, ``ttl`` in seconds), and keep it as tracked. The host's 201 or 403 is kept as
        whether it hosts us (``peers ls``, the best peer).

        :raises Refusal: the request is malformed (the message names the field); nothing
            was sent.
        """
        request = self.request(ports=ports, gpu=gpu, image=image, cpus=cpus, memory=memory,
                               ttl=ttl)
        with self.peers.client(peer) as client:
            # Kept until the answer is: a create whose answer is lost (this process killed,
            # the connection cut) is found at the host by the next 'containers ls'.
            asked = self.tracked.asking(client.endpoint.path, client.node_id)
            try:
                container = client.create_container(request)
            except PeerRefused as err:
                self.tracked.answered(asked)  # the host answered: it started nothing
                if err.status == 403 and not isinstance(err, RelayRefused):  # the host's own
                    self.peers.remember_hosting(client.node_id, False)
                raise
            except PeerError as err:
                if client.node_id is None and client.channel.secure:
                    self.tracked.answered(asked)  # never reached the node: nothing was sent
                    raise
                raise PeerError(f"{err} (if the host got the request it may have started "
                                f"the container: 'p2prc containers ls' finds it)") from None
        self.peers.remember_hosting(client.node_id, True)
        self.tracked.add(container)
        self.tracked.answered(asked)
        return container

    def request(self, *, ports: int = 0, gpu: Gpus = False, image: str | None = None,
                cpus: float | None = None, memory: int | None = None,
                ttl: int | None = None) -> ContainerRequest:
        """The one place a container request is built from what a user asked, with our SSH
        key, and checked (``wire.ContainerRequest``) before it is sent.

        :raises Refusal: a field is malformed (the message names it).
        """
        _, public_key = self.ssh_key()
        asked: dict[str, Any] = {"ssh_key": public_key, "ports": ports, "gpu": gpu}
        for name, value in (("image", image), ("cpus", cpus), ("memory", memory),
                            ("ttl", ttl)):
            if value is not None:
                asked[name] = value
        try:
            return convert(asked, ContainerRequest)
        except WireError as err:
            raise Refusal(str(err)) from None

    def states(self) -> list[tuple[RemoteContainer, str]]:
        """Each tracked container and its state as its host tells (``unreachable`` when the
        host cannot be asked, ``gone`` when it no longer runs it). Containers that creates
        whose answer never came started are tracked first (``find_unanswered``; where that
        fails, a full disk say, the listing goes on without them)."""
        return self.states_and_why()[0]

    def states_and_why(self) -> tuple[list[tuple[RemoteContainer, str]], dict[str, str]]:
        """``states``, and why each host that could not be asked could not (by its
        endpoint: no answer, a refusal, clocks too far apart)."""
        with contextlib.suppress(P2PRCError, OSError):
            self.find_unanswered()
        found = []
        why: dict[str, str] = {}
        for members in _by_host(list(self.tracked.containers().values())):
            try:
                live: dict[str, str] | None = self._live(members[0])
            except PeerError as err:
                live = None
                why[members[0].endpoint] = str(err)
            for container in members:
                state = "unreachable" if live is None else live.get(container.id, "gone")
                if state == "gone" and container.expires <= time.time():
                    state = "expired"  # its lease ran out and the host removed it
                found.append((container, state))
        return found, why

    def find_unanswered(self) -> list[RemoteContainer]:
        """Ask each host that a create went to, from a process that ended before its answer
        came, for our containers there, and track for each such create the one it started
        (ours, not tracked, made since it was sent; checked as a create's answer is). A
        host that cannot be asked now is asked again next time. Returns those found."""
        found: list[RemoteContainer] = []
        tracked = set(self.tracked.containers())
        by_host: dict[tuple[str, str | None], list[tuple[str, float]]] = {}
        for key, asked in self.tracked.asked().items():
            by_host.setdefault((asked.endpoint, asked.node_id), []).append((key, asked.at))
        mine = self.peers.identity.node_id
        budget = time.monotonic() + 2 * self.settings.request_timeout  # hosts that are down
        for (endpoint, node_id), creates in by_host.items():  # are asked again next time
            if time.monotonic() > budget:
                break
            try:
                where = parse_path(endpoint, node_id)
                ways = [where] + [e for e in self._table_ways(node_id) if e != where]
                with self.peers.client(ways) as client:
                    listed = client.list_containers()
                    answered_by = client.node_id if client.channel.secure else None
                    named = client.named_host
            except (PeerError, ValueError):
                continue
            candidates = sorted((r for r in listed if r.id not in tracked
                                 and r.owner in (None, mine)), key=lambda r: r.created)
            here: list[RemoteContainer] = []
            for _, at in sorted(creates, key=lambda c: c[1]):
                # Its host's clock may differ from ours: ten minutes of slack.
                reply = next((r for r in candidates if r.created >= at - 600), None)
                if reply is not None:
                    candidates.remove(reply)
                    with contextlib.suppress(PeerError):  # no host key to pin: its lease
                        here.append(RemoteContainer.from_reply(  # ends it
                            reply, where, answered_by, named))
            self.tracked.add_all(here)
            tracked |= {c.id for c in here}
            found += here
            for key, _ in creates:
                self.tracked.answered(key)
        return found

    def _live(self, container: RemoteContainer) -> dict[str, str]:
        """Our containers on ``container``'s host: id -> state."""
        with self.peers.client(self.paths_to(container)) as client:
            return {c.id: c.state_word for c in client.list_containers()}

    def check_alive(self, containers: list[RemoteContainer]) -> None:
        """Ask each host whether our containers there still run, before anything logs in:
        a port the host gave to someone else since must not be mistaken for ours.

        :raises P2PRCError: ``CONTAINER is gone``, or its host cannot be asked.
        """
        for members in _by_host(containers):
            live = self._live(members[0])
            for container in members:
                if container.id not in live:
                    raise P2PRCError(f"{container.short_id} is gone from "
                                     f"{container.endpoint} (removed by its host, or its "
                                     f"lease ran out): 'p2prc rm {container.short_id}' forgets "
                                     f"it")
                if live[container.id] != "running":
                    raise P2PRCError(f"{container.short_id} on {container.endpoint} is "
                                     f"{live[container.id]}, not running")

    def remove(self, container: RemoteContainer) -> bool:
        """Remove a container from its host and forget it; False if the host had removed it
        already."""
        with self.peers.client(self.paths_to(container)) as client:
            try:
                client.remove_container(container.id)
                removed = True
            except PeerRefused as err:
                if err.status != 404:
                    raise
                removed = False
        self.forget(container)
        return removed

    def forget(self, container: RemoteContainer) -> None:
        """Forget a container its host removed (or was asked to)."""
        self.tracked.forget(container.id)
        (self.home / "ssh" / f"known_hosts_{container.short_id}").unlink(missing_ok=True)

    def paths_to(self, container: RemoteContainer) -> list[Endpoint]:
        """Every way to reach a container's host: where it was started, then the host's dial
        ladder from the table (its addresses now, and its relays)."""
        _ = self.peers.punched  # a relay among them: a punched path is tried first
        paths = [container.host_endpoint]
        return paths + [e for e in self._table_ways(container.node_id) if e not in paths]

    def _table_ways(self, node_id: str | None) -> list[Endpoint]:
        """The node's dial ladder from the table (none for a node it does not hold)."""
        entry = self.peers.entries().get(node_id or "")
        return [] if entry is None else list(self.peers.endpoints(entry))

    def tunnel_command(self, container: RemoteContainer, port: int = 22) -> str:
        """The ProxyCommand that joins OpenSSH to ``port`` of the container."""
        from p2prc_core.tunnel import helper_command

        return helper_command(self.home, container.id, port, self.paths_to(container),
                              self.settings.request_timeout, self.peers.secure)

    def ssh_argv(self, container: RemoteContainer, direct: bool = False) -> list[str]:
        """ssh into ``container`` with our key and its pinned host key: through the host's
        p2prc port (one connection per container, shared by later calls for a minute after
        the last ends: ``tunnel.reuse_options``), or ``direct`` to the port its host
        publishes."""
        from p2prc_core.tunnel import ssh_command

        private, _ = self.ssh_key()
        return ssh_command(self.home, container, private, not direct, self.paths_to(container),
                           self.settings.request_timeout, self.peers.secure)

    def ssh_config(self, containers: list[RemoteContainer]) -> str:
        """OpenSSH Host entries (``p2prc-ID``) for ``containers``, through the tunnel with
        their pinned host keys (for scp, rsync, VS Code Remote, or ssh itself), sharing each
        container's one connection with ``p2prc ssh``."""
        private, _ = self.ssh_key()
        blocks = []
        for container in containers:
            argv = self.ssh_argv(container)
            lines = [f"Host p2prc-{container.short_id}",
                     f"    HostName p2prc-{container.short_id}", "    User root",
                     f"    IdentityFile {private}"]
            for option in (argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "-o"):
                key, _, value = option.partition("=")  # ssh_config expands %: keep it literal
                lines.append(f"    {key} {value.replace('%', '%%')}")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + ("\n" if blocks else "")

    def tunnel_stdio(self, container: RemoteContainer, port: int) -> None:
        """Join standard input and output to ``port`` of the container, through its host's
        p2prc port (OpenSSH's ProxyCommand)."""
        import asyncio

        from p2prc_core import tunnel_streams
        from p2prc_core.tunnel import let_go_of_stderr

        asyncio.run(tunnel_streams.stdio(self.paths_to(container), self.peers.identity,
                                         f"/v1/containers/{container.id}/tunnel",
                                         f"port={port}", self.settings.request_timeout,
                                         self.peers.secure, let_go_of_stderr))

    def forward(self, container: RemoteContainer, port: int, local_port: int,
                ready: Callable[[int], None],
                failed: Callable[[str], None] | None = None,
                stop: threading.Event | None = None) -> None:
        """Serve 127.0.0.1:``local_port`` as ``port`` of the container until interrupted, or
        until ``stop`` is set (from another thread)."""
        import asyncio

        from p2prc_core import tunnel_streams

        if port not in [p["internal"] for p in container.ports]:
            raise P2PRCError(f"{container.short_id} has ports "
                             f"{', '.join(str(p['internal']) for p in container.ports)}, "
                             f"not {port}")

        async def serve() -> None:
            stopped = None
            if stop is not None:
                stopped, loop = asyncio.Event(), asyncio.get_running_loop()

                def relay_stop() -> None:
                    stop.wait()
                    with contextlib.suppress(RuntimeError):  # the loop ended first
                        loop.call_soon_threadsafe(stopped.set)

                threading.Thread(target=relay_stop, daemon=True).start()
            await tunnel_streams.forward(self.paths_to(container), self.peers.identity,
                                         f"/v1/containers/{container.id}/tunnel",
                                         f"port={port}", self.settings.request_timeout,
                                         self.peers.secure, local_port, ready, stop=stopped,
                                         failed=failed)

        asyncio.run(serve())


def _by_host(containers: list[RemoteContainer]) -> list[list[RemoteContainer]]:
    """Containers grouped by the host that runs them (one request asks a host of all)."""
    by_host: dict[str, list[RemoteContainer]] = {}
    for container in containers:
        by_host.setdefault(container.endpoint, []).append(container)
    return [members for _, members in sorted(by_host.items())]
