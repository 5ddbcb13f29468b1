"""Fault suite: the home's disk full (a small tmpfs as P2PRC_HOME) during a table update, a
create and a run. Each says so in one line (no traceback, in the output or the server's log),
leaves no file half-written (every file in the home reads as before), and works again once
there is space."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import p2prc

from conftest import LiveServer, require, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.integration]




@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted after."""
    require(os.geteuid() == 0 and shutil.which("mount") is not None,
            "a tmpfs of its own needs root and mount")
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)
    require(done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to its last byte; the filler file's path."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free < 8192
    return filler


def snapshot(home: Path) -> dict[str, bytes]:
    """Every file in the home (but the filler, the server's log, and the empty files that
    locks and periodic jobs' stamps are), as bytes."""
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and p.name not in ("filler", "server.log")
            and p.suffix not in (".lock", ".stamp")}


def assert_one_clear_line(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    assert "full" in done.stderr.lower(), done.stderr
    print(f"\n{done.args[1:]}: {done.stderr.strip()}")


def assert_whole(home: Path) -> None:
    """No temporary file left, and every JSON file in the home reads."""
    left = [p.name for p in home.rglob("*.tmp")]
    assert not left, left
    for path in home.rglob("*.json"):
        json.loads(path.read_text())


def test_a_table_update_on_a_full_disk_changes_nothing_and_works_once_there_is_room(
        small_disk: Path, live_server: LiveServer) -> None:
    home = small_disk
    assert p2prc(home, "peers", "ls").returncode == 0  # the node's key and files made
    before = snapshot(home)
    filler = fill(home)
    added = p2prc(home, "peers", "add", live_server.peer())
    assert_one_clear_line(added)
    assert snapshot(home) == before  # nothing half-written, nothing lost
    assert_whole(home)
    filler.unlink()
    again = p2prc(home, "peers", "add", live_server.peer())
    assert again.returncode == 0, again.stderr
    listed = json.loads(p2prc(home, "peers", "ls", "--json").stdout)
    assert live_server.node_id in {p["node_id"] for p in listed}


def test_a_host_whose_disk_is_full_answers_503_and_serves_again_once_there_is_room(
        small_disk: Path, tmp_path: Path, engine: object) -> None:
    """The host's home on the full disk: a peer's table exchange and a create are refused
    with a 503 that says why; the host's log has one line each, no traceback; its files are
    whole; once there is room, both work."""
    me = NodeIdentity.load_or_create(tmp_path / "me")
    TrustStore(small_disk).add(me.node_id, "me")
    server = start_server(small_disk, env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                           "P2PRC_PUNCH": "false"})
    node_id = server.node_id
    try:
        before = snapshot(small_disk)
        filler = fill(small_disk)
        added = p2prc(tmp_path / "me", "peers", "add", server.peer())
        assert_one_clear_line(added)
        assert "disk" in added.stderr, added.stderr
        touched = p2prc(tmp_path / "me", "touch", server.peer(), "--json")
        if touched.returncode == 0:  # SQLite's journal still had room: it ran, and is whole
            started = json.loads(touched.stdout)["id"]
        else:
            assert_one_clear_line(touched)
            started = None
        assert "Traceback" not in server.output(), server.output()
        after = snapshot(small_disk)
        assert {k: v for k, v in after.items() if not k.startswith("server.db")} == \
            {k: v for k, v in before.items() if not k.startswith("server.db")}
        assert_whole(small_disk)
        filler.unlink()
        assert p2prc(tmp_path / "me", "peers", "add", server.peer()).returncode == 0
        if started is None:
            touched = p2prc(tmp_path / "me", "touch", server.peer(), "--json")
            assert touched.returncode == 0, touched.stderr
            started = json.loads(touched.stdout)["id"]
        listed = json.loads(p2prc(small_disk, "server", "containers", "ls", "--json").stdout)
        assert [c["id"] for c in listed] == [started]
        assert "Traceback" not in server.output()
    finally:
        server.stop()
        for c in engine.containers.list(  # type: ignore[attr-defined]
                all=True, filters={"label": f"org.p2prc.node={node_id}"}):
            c.remove(force=True)


@pytest.mark.docker
@pytest.mark.ansible
def test_a_run_on_a_full_disk_says_so_and_runs_once_there_is_room(
        small_disk: Path, tmp_path: Path, engine: object) -> None:
    require(shutil.which("ansible-playbook") is not None, "ansible-playbook is missing")
    home = small_disk
    NodeIdentity.load_or_create(home)
    TrustStore(tmp_path / "host").add(NodeIdentity.load_or_create(home).node_id, "me")
    server = start_server(tmp_path / "host", env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                                  "P2PRC_PUNCH": "false"})
    node_id = server.node_id
    playbook = tmp_path / "work" / "site.yml"
    playbook.parent.mkdir()
    playbook.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                        "    - command: echo ran\n")
    try:
        touched = p2prc(home, "touch", server.peer(), "--json")
        assert touched.returncode == 0, touched.stderr
        short = json.loads(touched.stdout)["id"][:12]
        before = snapshot(home)
        filler = fill(home)
        run = p2prc(home, "run", str(playbook), "--on", short)
        assert_one_clear_line(run)
        assert_whole(home)
        after = snapshot(home)
        assert {k: after[k] for k in before} == before  # what was there is as it was
        filler.unlink()
        again = p2prc(home, "run", str(playbook), "--on", short, "--json")
        assert again.returncode == 0, again.stderr + again.stdout
    finally:
        server.stop()
        for c in engine.containers.list(  # type: ignore[attr-defined]
                all=True, filters={"label": f"org.p2prc.node={node_id}"}):
            c.remove(force=True)
