"""The plugins' entry points kept in the home (``entry_points``): the same as
``importlib.metadata`` finds, found again whenever a distribution is installed, changed or
removed, and a kept file that is damaged or hostile is only a reason to look again."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc_core import entry_points as eps
from p2prc_core.entry_points import CACHE_FILE, EntryPoint, entry_points
from p2prc_core.plugins import ENTRY_POINT_GROUP, make_plugin_manager

PLUGIN = '''"""A plugin installed for a test."""
import pluggy

hookimpl = pluggy.HookimplMarker("p2prc")


@hookimpl
def p2prc_score_peer(peer):
    return {score}
'''


def as_metadata_finds() -> list[EntryPoint]:
    return [EntryPoint(ep.name, ep.value, ep.dist.metadata["Name"] if ep.dist else "",
                       ep.dist.version if ep.dist else "")
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path where a test installs distributions."""
    folder = tmp_path / "site"
    folder.mkdir()
    sys.path.append(str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in [m for m in sys.modules if m.startswith("extra_plugin")]:
        del sys.modules[name]


def install(site: Path, version: str, score: int, name: str = "extra") -> None:
    meta = site / f"p2prc_{name}-{version}.dist-info"
    for old in site.glob(f"p2prc_{name}-*.dist-info"):
        shutil.rmtree(old)
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: p2prc-{name}\n"
                                   f"Version: {version}\n")
    (meta / "entry_points.txt").write_text(f"[p2prc]\n{name} = {name}_plugin\n")
    (site / f"{name}_plugin.py").write_text(PLUGIN.format(score=score))


def scan_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(group: str) -> list[EntryPoint]:
        raise AssertionError("importlib.metadata was read")
    monkeypatch.setattr(eps, "_scan", fail)


def test_kept_entry_points_are_what_importlib_metadata_finds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = entry_points(ENTRY_POINT_GROUP, tmp_path)
    assert sorted(found, key=lambda e: e.name) == sorted(as_metadata_finds(),
                                                         key=lambda e: e.name)
    assert {"docker", "ansible", "scoring"} <= {e.name for e in found}
    scan_fails(monkeypatch)
    assert entry_points(ENTRY_POINT_GROUP, tmp_path) == found  # kept: not read again


def test_installing_upgrading_and_removing_a_plugin_is_seen_at_the_next_start(
        tmp_path: Path, site: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert "extra" not in {e.name for e in entry_points(ENTRY_POINT_GROUP, home)}
    install(site, "1.0", 5)
    extra = {e.name: e for e in entry_points(ENTRY_POINT_GROUP, home)}["extra"]
    assert (extra.distribution, extra.version, extra.value) == ("p2prc-extra", "1.0",
                                                                "extra_plugin")
    hooks = make_plugin_manager(home=home)
    assert "extra" in {i.name for i in hooks.plugin_info()}
    install(site, "2.0", 7)  # upgraded: another metadata folder
    assert {e.name: e for e in entry_points(ENTRY_POINT_GROUP, home)}["extra"].version == "2.0"
    # Its entry points file rewritten in place (an editable install's, say): seen too.
    points = next(site.glob("*.dist-info")) / "entry_points.txt"
    points.write_text("[p2prc]\nrenamed = extra_plugin\n")
    os.utime(points, ns=(1, 1))  # even with a time that went back
    assert "renamed" in {e.name for e in entry_points(ENTRY_POINT_GROUP, home)}
    shutil.rmtree(next(site.glob("*.dist-info")))
    names = {e.name for e in entry_points(ENTRY_POINT_GROUP, home)}
    assert "extra" not in names and "renamed" not in names


@pytest.mark.parametrize("kept", [
    "not json at all",
    "[]",
    '{"key": 1}',
    '{"key": "KEY", "groups": []}',
    '{"key": "KEY", "groups": {"p2prc": {"docker": "os:system"}}}',
    '{"key": "KEY", "groups": {"p2prc": [["evil", "os:system", "x"]]}}',
    '{"key": "KEY", "groups": {"p2prc": [["evil", 1, "x", "y"]]}}',
    '{"key": "another machine", "groups": {"p2prc": [["evil", "os:system", "x", "y"]]}}',
])
def test_a_damaged_or_foreign_file_is_looked_past(tmp_path: Path, kept: str) -> None:
    (tmp_path / CACHE_FILE).write_text(kept.replace("KEY", eps.installed_key().replace(
        "\\", "\\\\").replace("\n", "\\n").replace("\0", "\\u0000")))
    found = entry_points(ENTRY_POINT_GROUP, tmp_path)
    assert "evil" not in {e.name for e in found}
    assert sorted(found, key=lambda e: e.name) == sorted(as_metadata_finds(),
                                                         key=lambda e: e.name)
    assert json.loads((tmp_path / CACHE_FILE).read_text())["key"] == eps.installed_key()


def test_a_home_that_cannot_be_written_only_means_looking_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no such home"
    assert entry_points(ENTRY_POINT_GROUP, missing) == entry_points(ENTRY_POINT_GROUP)
    assert not missing.exists()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    assert entry_points(ENTRY_POINT_GROUP, tmp_path)  # a full disk: found, not kept
    assert list(tmp_path.iterdir()) == []  # and no half-written file left
