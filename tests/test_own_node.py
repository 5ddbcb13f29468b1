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
