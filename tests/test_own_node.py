"""This node's ``server.json``: what a command run beside the server learns of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from p2prc_core.config import Settings
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.services import NodeServices


@pytest.fixture
def services(tmp_path: Path) -> NodeServices:
    return NodeServices(Settings(port=8088), tmp_path, make_plugin_manager(
        load_entrypoints=False))


def test_a_server_beside_this_command_gives_its_real_port(services: NodeServices) -> None:
    (services.home / "server.json").write_text(json.dumps(
        {"pid": os.getpid(), "port": 9123, "host": "::"}))
    running = services.own.running_server()
    assert running is not None and (running.pid, running.port) == (os.getpid(), 9123)
    assert services.own.served_settings.port == 9123 and services.own.publishes()


@pytest.mark.parametrize("written", [
    {"pid": True, "port": 9123},  # a bool is no process id (1 would be init, always alive)
    {"pid": 0, "port": 9123}, {"pid": os.getpid(), "port": 70000}, {"port": 9123}, [],
])
def test_a_damaged_server_file_names_no_server(services: NodeServices, written: object) -> None:
    (services.home / "server.json").write_text(json.dumps(written))
    assert services.own.running_server() is None
    assert services.own.served_settings.port == 8088 and not services.own.publishes()


def test_a_record_built_before_the_node_moved_is_never_served_after(
        services: NodeServices, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record names the relay the node waits at. One built from reach.json as it was
    (another thread's build under way hands it out while the relay changes) is built
    again, not served."""
    from p2prc_core.reach_state import ReachState

    relay = "b" * 26 + "@192.0.2.9:8088"
    assert "relays" not in services.own.record()
    cache = services.own._record
    built_before = cache.get()
    ReachState(services.home).update(relay=relay)
    monkeypatch.setattr(cache, "get", lambda: built_before)  # what a busy cache hands out
    assert services.own.record().get("relays") == [relay]
