"""The contrib plugin, installed with pip into its own directory, loads by its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import P2PRC, require

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "p2prc-gpu-first"

RANK = """
import json
from p2prc_core.models import KnownPeer
from p2prc_core.plugins import make_plugin_manager
hooks = make_plugin_manager()
peers = [KnownPeer("near-cpu", latency_ms=1.0),
         KnownPeer("far-gpu", latency_ms=60.0, specs={"gpus": ["A100"], "gpus_free": 1}),
         KnownPeer("busy-gpu", latency_ms=0.5, specs={"gpus": ["H200"], "gpus_free": 0}),
         KnownPeer("dead-gpu", latency_ms=None, failures=3, specs={"gpus": [{"name": "X"}]})]
print(json.dumps([p.node_id for p in hooks.rank_peers(peers)]))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(CONTRIB)], capture_output=True, text=True, timeout=300)
    require(result.returncode == 0, f"pip could not install the contrib plugin: {result.stderr}")
    return target


def env(site: Path | None, home: Path) -> dict[str, str]:
    full = {**os.environ, "P2PRC_HOME": str(home)}
    if site:
        full["PYTHONPATH"] = str(site)
    return full


@pytest.mark.integration
def test_contrib_plugin_shows_in_p2prc_plugins(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run([P2PRC, "plugins", "--json"], capture_output=True, text=True,
                            env=env(installed, tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["gpu_first"] == {"name": "gpu_first", "distribution": "p2prc-gpu-first",
                                   "version": "0.1.0", "hooks": ["p2prc_score_peer"]}


@pytest.mark.integration
def test_contrib_plugin_score_is_used(installed: Path, tmp_path: Path) -> None:
    def ranking(site: Path | None) -> list[str]:
        out = subprocess.run([sys.executable, "-c", RANK], capture_output=True, text=True,
                             env=env(site, tmp_path), timeout=60, check=True).stdout
        ranked: list[str] = json.loads(out)
        return ranked

    assert ranking(None) == ["busy-gpu", "near-cpu", "far-gpu", "dead-gpu"]
    # A free GPU outranks nearness; a GPU that containers hold all of counts for nothing.
    assert ranking(installed) == ["far-gpu", "busy-gpu", "near-cpu", "dead-gpu"]


@pytest.mark.integration
def test_contrib_plugin_can_be_disabled(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run([P2PRC, "plugins", "--json"], capture_output=True, text=True,
                            env={**env(installed, tmp_path), "P2PRC_DISABLE_PLUGINS": "gpu_first"},
                            timeout=60)
    assert "gpu_first" not in {p["name"] for p in json.loads(result.stdout)}
