"""What the client keeps of the containers it started on peers, and its groups:
``containers.json``, ``groups.json``."""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2prc_core import pids
from p2prc_core.errors import P2PRCError, PeerError
from p2prc_core.models import PUBLIC_KEY, Endpoint
from p2prc_core.storage import read_json_object, update_json
from p2prc_core.wire import ContainerReply, SshLogin, WireError, convert, decode, to_builtins

_GROUP = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


@dataclass
class RemoteContainer:
    """A container this client started on a peer: where it is and how to log in."""

    id: str
    endpoint: str  # the peer server that runs it, as this client dialled it
    host: str  # the address to reach its ports at
    ssh_port: int
    host_key: str  # pinned: the reply came from the host that runs it
    ports: list[dict[str, Any]]  # [{"name", "internal", "external"}]; the first is SSH's
    image: str
    created: float
    expires: float
    node_id: str | None = None
    gpu: bool = False
    gpus: list[int] = field(default_factory=list)  # the host's indexes of the GPUs it holds
    used_ports: list[int] = field(default_factory=list)  # extra ports runs were handed
    direct: bool = False  # the host publishes its ports on its addresses, not loopback only
    ssh: dict[str, Any] | None = None  # how to log in, as the host said it (checked)

    @classmethod
    def from_reply(cls, reply: bytes | Any, endpoint: Endpoint,
                   node_id: str | None = None, named_host: str | None = None) -> RemoteContainer:
        """Check a host's answer to a create (``wire.ContainerReply``) before anything of it
        is kept or used: its bytes as they came (decoded and checked in one pass), or the
        same already parsed. ``node_id``: the node whose key answered (the channel's),
        which wins over the one the reply claims. ``named_host``: the host the request named
        (its Host header), where it was not ``endpoint``'s (another way connected).

        :raises PeerError: the answer is not a container as p2prc describes one.
        """
        try:
            checked = decode(reply, ContainerReply) if isinstance(reply, bytes) else \
                convert(reply, ContainerReply)
            if not checked.ssh.host_key:
                raise WireError("it gives no host key to pin")
            ssh = checked.ssh.completed(SshLogin.of(
                checked.id, named_host or endpoint.host, checked.ssh.port,
                checked.ssh.host_key, checked.direct))
        except WireError as err:
            raise PeerError(f"{endpoint} answered the create with something that is not a "
                            f"container ({err})") from None
        return cls(id=checked.id, endpoint=endpoint.path, host=endpoint.host,
                   ssh_port=ssh.port, host_key=ssh.host_key,
                   ports=[to_builtins(p) for p in checked.ports], image=checked.image,
                   created=checked.created, expires=checked.expires,
                   node_id=node_id if node_id is not None else checked.node_id,
                   gpu=checked.gpu, gpus=sorted(set(checked.gpus)), direct=checked.direct,
                   ssh=to_builtins(ssh))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemoteContainer | None:
        """What ``to_json`` wrote; None for an entry that is damaged (it is not used)."""
        known = {f.name for f in fields(cls)}
        try:
            container = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return None
        if not isinstance(container.host_key, str) or \
                not PUBLIC_KEY.fullmatch(container.host_key) or \
                not isinstance(container.ports, list) or not container.ports:
            return None
        if not isinstance(container.ssh, dict):
            container.ssh = None  # written before the host's block was kept: built again
        return container

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def as_dict(self) -> dict[str, Any]:
        """What ``--json`` listings show: the kept fields, and how to log in (the host's
        block, checked when it came; for an entry kept before, the same built here)."""
        ssh = self.ssh or to_builtins(SshLogin.of(self.id, self.host, self.ssh_port,
                                                  self.host_key, self.direct))
        return {**self.to_json(), "ssh": ssh}

    @property
    def host_endpoint(self) -> Endpoint:
        """The peer server that runs it, and the node that must answer there."""
        from p2prc_core.models import parse_path

        return parse_path(self.endpoint, self.node_id)

    @property
    def extra_ports(self) -> list[dict[str, Any]]:
        return self.ports[1:]

    @property
    def short_id(self) -> str:
        return self.id[:12]


ASKED_DAYS = 7  # a create whose host never answered since is forgotten after this


@dataclass(frozen=True)
class Asked:
    """A create sent whose answer never came: where to, and when."""

    endpoint: str
    node_id: str | None
    at: float


class Tracked:
    """Containers this client started (id -> where and how to reach it), and groups.

    ``asked.json`` holds each create sent whose answer has not come yet: a client killed
    (or a connection lost) between its create and the host's answer finds what the host
    started there at its next ``containers ls`` (``ContainersOnPeers.states``)."""

    def __init__(self, home: Path):
        self.containers_path = home / "containers.json"
        self.groups_path = home / "groups.json"
        self.asked_path = home / "asked.json"

    def asking(self, endpoint: str, node_id: str | None) -> str:
        """Note a create about to be sent to ``endpoint`` (the node ``node_id``) by this
        process; its key."""
        key = secrets.token_hex(8)
        pid = os.getpid()
        update_json(self.asked_path, lambda data: data.update(
            {key: {"endpoint": endpoint, "node_id": node_id, "at": time.time(), "pid": pid,
                   "pid_started": pids.started(pid)}}))
        return key

    def answered(self, key: str) -> None:
        update_json(self.asked_path, lambda data: data.pop(key, None))

    def asked(self) -> dict[str, Asked]:
        """The creates not answered whose process is gone (a live one settles its own);
        a damaged entry, or one older than ``ASKED_DAYS``, is dropped."""
        found: dict[str, Asked] = {}
        stale = []
        for key, entry in read_json_object(self.asked_path).items():
            if isinstance(entry, dict) and isinstance(entry.get("endpoint"), str) and \
                    isinstance(entry.get("node_id"), str | None) and \
                    isinstance(entry.get("at"), int | float) and \
                    time.time() - entry["at"] < ASKED_DAYS * 86400:
                if not pids.alive(entry.get("pid"), entry.get("pid_started", 0)):
                    found[key] = Asked(entry["endpoint"], entry["node_id"], entry["at"])
            else:
                stale.append(key)
        if stale:
            update_json(self.asked_path, lambda data: [data.pop(k, None) for k in stale])
        return found

    def add_all(self, containers: list[RemoteContainer]) -> None:
        """Track several at once (one write)."""
        if containers:
            update_json(self.containers_path, lambda data: data.update(
                {c.id: c.to_json() for c in containers}))

    def containers(self) -> dict[str, RemoteContainer]:
        """The tracked containers; a damaged entry is left out (and left in the file)."""
        found = {}
        for key, value in read_json_object(self.containers_path).items():
            container = RemoteContainer.from_json(value) if isinstance(value, dict) else None
            if container is not None:
                found[key] = container
        return found

    def add(self, container: RemoteContainer) -> None:
        update_json(self.containers_path,
                    lambda data: data.update({container.id: container.to_json()}))

    def forget(self, container_id: str) -> None:
        update_json(self.containers_path, lambda data: data.pop(container_id, None))

        def leave(groups: dict[str, Any]) -> None:
            for members in groups.values():
                if container_id in members:
                    members.remove(container_id)

        update_json(self.groups_path, leave)

    def reserve_ports(self, containers: list[RemoteContainer], count: int,
                      bundle: str = "") -> tuple[dict[str, list[dict[str, int]]],
                                                 dict[str, list[dict[str, int]]]]:
        """Hand each container ``count`` of its extra ports: those an earlier run of the
        same ``bundle`` had (a re-run serves on the same ports), then ports no run used.
        Returns what each got, and which of those are newly taken (what a failed run gives
        back). :raises P2PRCError: one has too few left (then nothing is marked)."""
        def reserve(data: dict[str, Any]) -> tuple[dict[str, list[dict[str, int]]],
                                                   dict[str, list[dict[str, int]]]]:
            chosen: dict[str, list[dict[str, int]]] = {}
            newly: dict[str, list[dict[str, int]]] = {}
            for container in containers:
                entry = data[container.id]
                used = entry.get("used_ports", [])
                owners = entry.get("port_owners", {})
                mine = [p for p in container.extra_ports
                        if bundle and owners.get(str(p["external"])) == bundle]
                free = [p for p in container.extra_ports if p["external"] not in used]
                if len(mine) + len(free) < count:
                    raise P2PRCError(f"container {container.short_id} has {len(free)} unused "
                                     f"extra ports; the playbook needs {count} (touch a new "
                                     f"one with --ports {count})")
                picked = (mine + free)[:count]
                chosen[container.id] = [{"internal": p["internal"], "external": p["external"]}
                                        for p in picked]
                newly[container.id] = [p for p in chosen[container.id] if p["external"] not in
                                       {m["external"] for m in mine}]
            for container_id, ports in newly.items():
                entry = data[container_id]
                entry.setdefault("used_ports", []).extend(p["external"] for p in ports)
                if bundle:
                    owners = entry.setdefault("port_owners", {})
                    owners.update({str(p["external"]): bundle for p in ports})
            return chosen, newly

        found: tuple[dict[str, list[dict[str, int]]], dict[str, list[dict[str, int]]]] = \
            update_json(self.containers_path, reserve)
        return found

    def release_ports(self, handed: dict[str, list[dict[str, int]]]) -> None:
        """Give back ports that ``reserve_ports`` newly handed out (to a run that failed)."""
        def release(data: dict[str, Any]) -> None:
            for container_id, ports in handed.items():
                entry = data.get(container_id)
                if isinstance(entry, dict) and isinstance(entry.get("used_ports"), list):
                    back = {p["external"] for p in ports}
                    entry["used_ports"] = [p for p in entry["used_ports"] if p not in back]
                    owners = entry.get("port_owners")
                    if isinstance(owners, dict):
                        for port in back:
                            owners.pop(str(port), None)

        update_json(self.containers_path, release)

    def find(self, text: str) -> RemoteContainer:
        """A tracked container by id or unique id prefix (at least 4 characters)."""
        data = self.containers()
        if text in data:
            return data[text]
        found = [c for cid, c in data.items() if len(text) >= 4 and cid.startswith(text)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise P2PRCError(f"{text!r} matches {len(found)} containers: give more of the id")
        raise P2PRCError(f"no tracked container {text!r} ('p2prc containers ls' lists them)")

    def resolve(self, text: str) -> list[RemoteContainer]:
        """A container id, or a group name standing for its members."""
        groups = self.groups()
        if text in groups:
            return [self.find(cid) for cid in groups[text]]
        return [self.find(text)]

    # -- groups --------------------------------------------------------------------------------

    def groups(self) -> dict[str, list[str]]:
        return read_json_object(self.groups_path)

    def create_group(self, name: str) -> None:
        if not _GROUP.fullmatch(name):
            raise P2PRCError(f"{name!r} is not a group name (a letter, then letters, digits, "
                             f"'.', '_' or '-')")
        if name in self.containers():
            raise P2PRCError(f"{name!r} is a container id")

        def create(groups: dict[str, Any]) -> None:
            if name in groups:
                raise P2PRCError(f"group {name!r} exists already")
            groups[name] = []

        update_json(self.groups_path, create)

    def change_group(self, name: str, container: str, add: bool) -> str:
        container_id = self.find(container).id

        def change(groups: dict[str, Any]) -> None:
            if name not in groups:
                raise P2PRCError(f"no group {name!r} ('p2prc group create {name}' makes it)")
            members = groups[name]
            if add and container_id not in members:
                members.append(container_id)
            elif not add:
                if container_id not in members:
                    raise P2PRCError(f"{container_id[:12]} is not in group {name!r}")
                members.remove(container_id)

        update_json(self.groups_path, change)
        return container_id

    def delete_group(self, name: str) -> None:
        def delete(groups: dict[str, Any]) -> None:
            if groups.pop(name, None) is None:
                raise P2PRCError(f"no group {name!r}")

        update_json(self.groups_path, delete)
