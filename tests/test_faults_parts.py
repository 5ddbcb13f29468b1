"""The fault suite's parts that need no engine: the fault points' setting, the rule that
tells a dead create's place, and the client's record of creates whose answer never came."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from p2prc_core import faults
from p2prc_core.config import Settings
from p2prc_core.container_recovery import creator_alive, place_token
from p2prc_core.identity import NodeIdentity
from p2prc_core.my_containers import ASKED_DAYS, Tracked
from p2prc_core.on_peers import ContainersOnPeers
from p2prc_core.wire import ContainerReply, convert

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"


def test_fault_points_are_named_and_checked() -> None:
    assert faults.parse("") == {}
    assert faults.parse("create.started=kill, create.reserved=sleep:1.5") == {
        "create.started": "kill", "create.reserved": "sleep:1.5"}
    with pytest.raises(faults.FaultSpecError, match="no fault point 'create.nowhere'"):
        faults.parse("create.nowhere=kill")
    assert faults.parse("create.started=sleep:0") == {"create.started": "sleep:0"}
    for bad in ("create.started", "create.started=explode", "create.started=sleep:x",
                "create.started=sleep:-1", "create.started=sleep:99999"):
        with pytest.raises(faults.FaultSpecError, match="kill, kill-server or sleep"):
            faults.parse(bad)


def test_a_fault_point_kills_only_where_it_is_named(tmp_path: Path) -> None:
    code = ("from p2prc_core import faults; faults.point('create.reserved'); print('past', "
            "flush=True); faults.point('create.started'); print('never')")
    env = {**os.environ, faults.ENV: "create.started=kill"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == -9 and done.stdout == "past\n"
    # kill-server from a process whose parent is not a p2prc server kills only itself.
    env[faults.ENV] = "create.started=kill-server"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == -9
    env[faults.ENV] = "create.started=sleep:0.01"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0 and done.stdout == "past\nnever\n"


def test_a_place_names_its_process_and_is_stale_when_that_process_is_gone() -> None:
    mine = place_token("abc")
    assert mine.startswith(f"pending-{os.getpid()}-") and creator_alive(mine)
    pid, started = mine.split("-")[1:3]
    assert int(started) > 0
    # Another process that took this id later (a reused pid) does not hold it.
    assert not creator_alive(f"pending-{pid}-{int(started) + 1}-abc")
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not creator_alive(f"pending-{gone.pid}-{started}-abc")
    # A place in another form runs out by its time instead; odd text never raises.
    for other in ("pending-" + "f" * 32, "pending-1712345678901234567-1-ab",
                  "pending-\u00b2-1-ab", "pending-0-0-ab", "pending--1-1-ab"):
        assert creator_alive(other)


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_creates_without_an_answer_are_kept_until_answered(tmp_path: Path) -> None:
    tracked = Tracked(tmp_path)
    key = tracked.asking("127.0.0.1:4000", "n" * 52)
    other = tracked.asking("relay 10.0.0.1:4000", None)
    assert tracked.asked() == {}  # this process lives: it settles its own
    data = json.loads(tracked.asked_path.read_text())
    for entry in data.values():
        entry["pid"] = dead_pid()  # as if the process that sent them was killed
    tracked.asked_path.write_text(json.dumps(data))
    found = tracked.asked()
    assert {k: (a.endpoint, a.node_id) for k, a in found.items()} == {
        key: ("127.0.0.1:4000", "n" * 52), other: ("relay 10.0.0.1:4000", None)}
    tracked.answered(key)
    assert list(tracked.asked()) == [other]


def test_damaged_or_old_entries_of_unanswered_creates_are_dropped(tmp_path: Path) -> None:
    tracked = Tracked(tmp_path)
    good = tracked.asking("127.0.0.1:4000", None)
    data = json.loads(tracked.asked_path.read_text())
    data[good]["pid"] = dead_pid()
    data.update({"a": "x", "b": {"endpoint": 5, "node_id": None, "at": time.time()},
                 "c": {"endpoint": "h:1", "node_id": 7, "at": time.time()},
                 "d": {"endpoint": "h:1", "node_id": None, "at": "now"},
                 "old": {"endpoint": "h:1", "node_id": None,
                         "at": time.time() - ASKED_DAYS * 86400 - 1}})
    tracked.asked_path.write_text(json.dumps(data))
    assert list(tracked.asked()) == [good]
    assert list(json.loads(tracked.asked_path.read_text())) == [good]
    # A pid that is no process id (a hostile or damaged file) is never taken as dead.
    for pid in (2**63, -1, 0, True, "1"):
        data = {good: {"endpoint": "h:1", "node_id": None, "at": time.time(), "pid": pid}}
        tracked.asked_path.write_text(json.dumps(data))
        assert tracked.asked() == {}


class _Host:
    """A host's side of a listing, as ``find_unanswered`` sees it (no network)."""

    def __init__(self, listed: list[dict[str, Any]], node_id: str):
        self.listed, self.node_id, self.lists = listed, node_id, 0

    def client(self, ways: Any) -> Any:
        host = self

        class Client:
            node_id = host.node_id
            channel = SimpleNamespace(secure=True)
            named_host = "127.0.0.1"

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: Any) -> None:
                return None

            def list_containers(self) -> list[ContainerReply]:
                host.lists += 1
                return [convert(r, ContainerReply) for r in host.listed]

        return Client()


def _listed(index: int, owner: str, created: float) -> dict[str, Any]:
    return {"id": f"{index:064x}", "image": "p2prc/base:latest",
            "ports": [{"name": "ssh", "internal": 22, "external": 40000 + index}],
            "ssh": {"port": 40000 + index, "host_key": HOST_KEY}, "created": created,
            "expires": created + 3600, "owner": owner}


def test_a_host_listing_many_containers_gets_one_tracked_per_lost_answer(
        tmp_path: Path) -> None:
    """Two creates whose answers were lost: of a host's listing (a hostile one lists
    thousands, some of other callers), only ours made since each create was sent are taken,
    one for each create; the host is asked once."""
    me = NodeIdentity.load_or_create(tmp_path)
    sent = time.time()
    listed = [_listed(i, "someone-else", sent + 1) for i in range(1, 2000)]
    listed += [_listed(5000, me.node_id, sent - 4000),  # older than both creates
               _listed(5001, me.node_id, sent + 2), _listed(5002, me.node_id, sent + 3),
               _listed(5003, me.node_id, sent + 4)]
    host = _Host(listed, "h" * 26)
    peers = SimpleNamespace(identity=me, client=host.client, entries=dict)
    on_peers = ContainersOnPeers(Settings(), tmp_path, peers, Tracked(tmp_path))  # type: ignore[arg-type]
    for _ in range(2):
        on_peers.tracked.asking("127.0.0.1:4000", "h" * 26)
    data = json.loads(on_peers.tracked.asked_path.read_text())
    for entry in data.values():
        entry["pid"], entry["at"] = dead_pid(), sent
    on_peers.tracked.asked_path.write_text(json.dumps(data))
    started = time.monotonic()
    found = on_peers.find_unanswered()
    assert time.monotonic() - started < 10
    assert [c.id for c in found] == [f"{5001:064x}", f"{5002:064x}"]
    assert set(on_peers.tracked.containers()) == {c.id for c in found}
    assert all(c.node_id == "h" * 26 for c in found)  # the channel's node, not the reply's
    assert host.lists == 1 and on_peers.tracked.asked() == {}
    assert on_peers.find_unanswered() == [] and host.lists == 1  # settled: asked once
