"""What the client keeps of its containers and groups: ``containers.json``, ``groups.json``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from p2prc_core.errors import P2PRCError
from p2prc_core.storage import atomic_write_json, locked, read_json_file

_GROUP = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class Tracked:
    """Containers this client started (id -> where and how to reach it), and groups."""

    def __init__(self, home: Path):
        self.containers_path = home / "containers.json"
        self.groups_path = home / "groups.json"

    def containers(self) -> dict[str, dict[str, Any]]:
        data = read_json_file(self.containers_path, {})
        return data if isinstance(data, dict) else {}

    def add(self, container: dict[str, Any]) -> None:
        with locked(self.containers_path):
            data = self.containers()
            data[container["id"]] = container
            atomic_write_json(self.containers_path, data)

    def forget(self, container_id: str) -> None:
        with locked(self.containers_path):
            data = self.containers()
            data.pop(container_id, None)
            atomic_write_json(self.containers_path, data)
        with locked(self.groups_path):
            groups = self.groups()
            for members in groups.values():
                if container_id in members:
                    members.remove(container_id)
            atomic_write_json(self.groups_path, groups)

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
        data = read_json_file(self.groups_path, {})
        return data if isinstance(data, dict) else {}

    def create_group(self, name: str) -> None:
        if not _GROUP.match(name):
            raise P2PRCError(f"{name!r} is not a group name (a letter, then letters, digits, "
                             f"'.', '_' or '-')")
        if name in self.containers():
            raise P2PRCError(f"{name!r} is a container id")
        with locked(self.groups_path):
            groups = self.groups()
            if name in groups:
                raise P2PRCError(f"group {name!r} exists already")
            groups[name] = []
            atomic_write_json(self.groups_path, groups)

    def change_group(self, name: str, container: str, add: bool) -> str:
        with locked(self.groups_path):
            groups = self.groups()
            if name not in groups:
                raise P2PRCError(f"no group {name!r} ('p2prc group create {name}' makes it)")
            container_id = self.find(container)["id"]
            members = groups[name]
            if add and container_id not in members:
                members.append(container_id)
            elif not add:
                if container_id not in members:
                    raise P2PRCError(f"{container_id[:12]} is not in group {name!r}")
                members.remove(container_id)
            atomic_write_json(self.groups_path, groups)
            return container_id

    def delete_group(self, name: str) -> None:
        with locked(self.groups_path):
            groups = self.groups()
            if groups.pop(name, None) is None:
                raise P2PRCError(f"no group {name!r}")
            atomic_write_json(self.groups_path, groups)
