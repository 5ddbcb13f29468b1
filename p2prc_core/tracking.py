"""What the client keeps of its containers and groups: ``containers.json``, ``groups.json``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from p2prc_core.errors import P2PRCError
from p2prc_core.storage import read_json_object, update_json

_GROUP = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class Tracked:
    """Containers this client started (id -> where and how to reach it), and groups."""

    def __init__(self, home: Path):
        self.containers_path = home / "containers.json"
        self.groups_path = home / "groups.json"

    def containers(self) -> dict[str, dict[str, Any]]:
        return read_json_object(self.containers_path)

    def add(self, container: dict[str, Any]) -> None:
        update_json(self.containers_path, lambda data: data.update({container["id"]: container}))

    def forget(self, container_id: str) -> None:
        update_json(self.containers_path, lambda data: data.pop(container_id, None))

        def leave(groups: dict[str, Any]) -> None:
            for members in groups.values():
                if container_id in members:
                    members.remove(container_id)

        update_json(self.groups_path, leave)

    def reserve_ports(self, containers: list[dict[str, Any]],
                      count: int) -> dict[str, list[dict[str, int]]]:
        """Hand each container ``count`` of its extra ports that no earlier run used, and
        mark them used. :raises P2PRCError: one has too few left (then nothing is marked)."""
        def reserve(data: dict[str, Any]) -> dict[str, list[dict[str, int]]]:
            chosen: dict[str, list[dict[str, int]]] = {}
            for container in containers:
                entry = data[container["id"]]
                used = set(entry.get("used_ports", []))
                free = [p for p in entry["ports"][1:] if p["external"] not in used]
                if len(free) < count:
                    raise P2PRCError(f"container {container['id'][:12]} has {len(free)} unused "
                                     f"extra ports; the playbook needs {count} (touch a new "
                                     f"one with --ports {count})")
                chosen[container["id"]] = [{"internal": p["internal"],
                                            "external": p["external"]} for p in free[:count]]
            for container_id, ports in chosen.items():
                data[container_id].setdefault("used_ports", []).extend(
                    p["external"] for p in ports)
            return chosen

        return update_json(self.containers_path, reserve)

    def find(self, text: str) -> dict[str, Any]:
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

    def resolve(self, text: str) -> list[dict[str, Any]]:
        """A container id, or a group name standing for its members."""
        groups = self.groups()
        if text in groups:
            return [self.find(cid) for cid in groups[text]]
        return [self.find(text)]

    # -- groups --------------------------------------------------------------------------------

    def groups(self) -> dict[str, list[str]]:
        return read_json_object(self.groups_path)

    def create_group(self, name: str) -> None:
        if not _GROUP.match(name):
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
        container_id: str = self.find(container)["id"]

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
