"""The fault suite's parts that need no engine: the fault points' setting, the rule that
tells a dead create's place, and the client's record of creates whose answer never came."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2prc_core import faults
from p2prc_core.container_recovery import creator_alive, place_token
from p2prc_core.my_containers import ASKED_DAYS, Tracked


def test_fault_points_are_named_and_checked() -> None:
    assert faults.parse("") == {}
    assert faults.parse("create.started=kill, create.reserved=sleep:1.5") == {
        "create.started": "kill", "create.reserved": "sleep:1.5"}
    with pytest.raises(faults.FaultSpecError, match="no fault point 'create.nowhere'"):
        faults.parse("create.nowhere=kill")
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
    assert mine == f"pending-{os.getpid()}-abc" and creator_alive(mine)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not creator_alive(f"pending-{gone.pid}-abc")
    # A place of an older version (no process id) runs out by its time instead.
    assert creator_alive("pending-" + "f" * 32)


def test_creates_without_an_answer_are_kept_until_answered(tmp_path: Path) -> None:
    tracked = Tracked(tmp_path)
    key = tracked.asking("127.0.0.1:4000", "n" * 52)
    other = tracked.asking("relay 10.0.0.1:4000", None)
    assert tracked.asked() == {key: ("127.0.0.1:4000", "n" * 52),
                               other: ("relay 10.0.0.1:4000", None)}
    tracked.answered(key)
    assert list(tracked.asked()) == [other]


def test_damaged_or_old_entries_of_unanswered_creates_are_dropped(tmp_path: Path) -> None:
    tracked = Tracked(tmp_path)
    good = tracked.asking("127.0.0.1:4000", None)
    data = json.loads(tracked.asked_path.read_text())
    data.update({"a": "x", "b": {"endpoint": 5, "node_id": None, "at": time.time()},
                 "c": {"endpoint": "h:1", "node_id": 7, "at": time.time()},
                 "d": {"endpoint": "h:1", "node_id": None, "at": "now"},
                 "old": {"endpoint": "h:1", "node_id": None,
                         "at": time.time() - ASKED_DAYS * 86400 - 1}})
    tracked.asked_path.write_text(json.dumps(data))
    assert list(tracked.asked()) == [good]
    assert list(json.loads(tracked.asked_path.read_text())) == [good]
