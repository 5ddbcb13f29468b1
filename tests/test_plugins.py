"""The plugin core: loading through entry points, blocking, failures, and every hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import falcon
import pytest
from falcon import testing

from conftest import BUILTINS, P2PRC
from p2prc_core import hookimpl
from p2prc_core.models import Address, KnownPeer
from p2prc_core.plugins import PluginLoadError, make_plugin_manager
from p2prc_core.server import create_app
from p2prc_core.services import NodeServices
from p2prc_plugins import scoring


def fake_distribution(root: Path, dist: str, module: str, source: str,
                      entry: str | None = None) -> Path:
    """A real installed distribution (dist-info + module) that importlib.metadata finds."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[p2prc]\n{entry or module} = {module}\n")
    (root / f"{module}.py").write_text(source)
    return root


def run_p2prc(*args: str, path: Path | None = None, env: dict[str, str] | None = None,
              home: Path) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "P2PRC_HOME": str(home), **(env or {})}
    if path:
        full["PYTHONPATH"] = str(path)
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, env=full, timeout=60)


def test_entry_points_load_every_builtin() -> None:
    hooks = make_plugin_manager()
    builtins = {i.name: i.hooks for i in hooks.plugin_info() if i.distribution == "p2prc"}
    assert builtins == {"address": ("p2prc_select_address",),
                        "scoring": ("p2prc_score_peer",),
                        "specs": ("p2prc_collect_specs",),
                        "nvidia": ("p2prc_collect_specs",),
                        "docker": ("p2prc_register_backends",),
                        "ansible": ("p2prc_register_runners",)}
    assert set(hooks.backends()) >= {"docker"} and set(hooks.runners()) >= {"ansible"}


def test_disabled_plugins_are_not_loaded() -> None:
    hooks = make_plugin_manager(disabled=["nvidia", "specs"])
    assert {"nvidia", "specs"}.isdisjoint(i.name for i in hooks.plugin_info())
    assert "gpus" not in hooks.collect_specs()


def test_p2prc_plugins_lists_name_distribution_version_hooks(home: Path) -> None:
    result = run_p2prc("plugins", "--json", home=home)
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["address"] == {"name": "address", "distribution": "p2prc", "version": "0.1.0",
                                 "hooks": ["p2prc_select_address"]}
    table = run_p2prc("plugins", home=home).stdout
    assert "address" in table and "p2prc_select_address" in table


def test_plugin_that_fails_to_import_is_named_without_traceback(tmp_path: Path) -> None:
    site = fake_distribution(tmp_path / "site", "p2prc-broken", "p2prc_broken",
                             "import does_not_exist_anywhere\n")
    result = run_p2prc("plugins", path=site, home=tmp_path / "home")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "plugin 'p2prc_broken' from p2prc-broken 1.2.3 failed to load" in lines[0]
    assert "ModuleNotFoundError: No module named 'does_not_exist_anywhere'" in lines[0]
    assert "P2PRC_DISABLE_PLUGINS=p2prc_broken" in lines[0]
    assert "Traceback" not in result.stderr
    # ... and the way out the message gives works.
    fixed = run_p2prc("plugins", path=site, home=tmp_path / "home",
                      env={"P2PRC_DISABLE_PLUGINS": "p2prc_broken"})
    assert fixed.returncode == 0 and "p2prc_broken" not in fixed.stdout


def test_plugin_with_an_unknown_hook_fails_validation(tmp_path: Path) -> None:
    source = ("from p2prc_core import hookimpl\n"
              "@hookimpl\ndef p2prc_score_pear(peer):\n    return 1\n")
    site = fake_distribution(tmp_path / "site", "p2prc-typo", "p2prc_typo", source)
    result = run_p2prc("plugins", path=site, home=tmp_path / "home")
    assert result.returncode == 1
    assert "plugin 'p2prc_typo' from p2prc-typo 1.2.3 failed to load" in result.stderr
    assert "p2prc_score_pear" in result.stderr and "Traceback" not in result.stderr


def test_plugin_with_a_wrong_argument_fails_validation() -> None:
    class Wrong:
        @hookimpl
        def p2prc_score_peer(self, peer, mood):  # type: ignore[no-untyped-def]
            return 1

    with pytest.raises(PluginLoadError, match=r"plugin 'wrong' .* failed to load.*mood"):
        make_plugin_manager(load_entrypoints=False, plugins=[("wrong", Wrong())])


# -- p2prc_select_address -------------------------------------------------------------------

def addresses(*texts: str) -> list[Address]:
    return [Address.parse(t) for t in texts]


def test_select_address_prefers_global_ipv6(hooks) -> None:  # type: ignore[no-untyped-def]
    pick = hooks.select_address
    assert str(pick(addresses("10.0.0.2", "8.8.4.4", "2001:db9::5", "fd00::5"), "dial")) \
        == "2001:db9::5"
    assert str(pick(addresses("10.0.0.2", "8.8.4.4", "fd00::5"), "dial")) == "8.8.4.4"
    assert str(pick(addresses("10.0.0.2", "fd00::5"), "advertise")) == "fd00::5"
    assert str(pick(addresses("10.0.0.2", "127.0.0.1"), "advertise")) == "10.0.0.2"
    assert pick(addresses("fe80::1", "::", "ff02::1"), "advertise") is None


def test_a_third_party_select_address_overrides_the_builtin(hooks) -> None:  # type: ignore[no-untyped-def]
    class PreferIPv4:
        @hookimpl
        def p2prc_select_address(self, candidates, purpose):  # type: ignore[no-untyped-def]
            v4 = [a for a in candidates if a.version == 4]
            return v4[0] if v4 else None

    hooks.pm.register(PreferIPv4(), name="prefer-ipv4")
    assert str(hooks.select_address(addresses("2001:db9::5", "8.8.4.4"), "dial")) == "8.8.4.4"
    # It abstains where it has no opinion, and the built-in still decides.
    assert str(hooks.select_address(addresses("2001:db9::5", "fd00::1"), "dial")) == "2001:db9::5"


# -- p2prc_score_peer -----------------------------------------------------------------------

def peer(node_id: str, latency: float | None, bandwidth: float | None = None,
         failures: int = 0, gpus: int = 0) -> KnownPeer:
    return KnownPeer(node_id=node_id, latency_ms=latency, bandwidth_mbps=bandwidth,
                      failures=failures, specs={"gpus": [{"name": "g"}] * gpus})


def test_score_peer_prefers_near_and_fast_and_puts_unreachable_last(hooks) -> None:  # type: ignore[no-untyped-def]
    near, far = peer("near", 2.0), peer("far", 40.0)
    fast = peer("fast", 40.0, bandwidth=900.0)
    dead = peer("dead", 1.0, failures=2)
    never = peer("never", None)
    ranked = hooks.rank_peers([dead, far, never, fast, near])
    assert [p.node_id for p in ranked[:3]] == ["near", "fast", "far"]
    assert {p.node_id for p in ranked[3:]} == {"dead", "never"}
    assert hooks.score_peer(dead) <= scoring.UNREACHABLE


def test_scores_from_several_plugins_add_up(hooks) -> None:  # type: ignore[no-untyped-def]
    class GPUBonus:
        @hookimpl
        def p2prc_score_peer(self, peer):  # type: ignore[no-untyped-def]
            return 100.0 * peer.gpu_count

    slow_gpu, fast_cpu = peer("gpu", 50.0, gpus=1), peer("cpu", 1.0)
    assert hooks.rank_peers([slow_gpu, fast_cpu])[0].node_id == "cpu"
    hooks.pm.register(GPUBonus(), name="gpu-bonus")
    assert hooks.score_peer(slow_gpu) == pytest.approx(100.0 - 50.0 + 100.0)
    assert hooks.rank_peers([slow_gpu, fast_cpu])[0].node_id == "gpu"


# -- p2prc_collect_specs --------------------------------------------------------------------

def test_collect_specs_merges_every_part(hooks) -> None:  # type: ignore[no-untyped-def]
    class Extra:
        @hookimpl
        def p2prc_collect_specs(self):  # type: ignore[no-untyped-def]
            return {"rack": "b4", "hostname": "overridden"}

    class FakeGPUs:
        @hookimpl
        def p2prc_collect_specs(self):  # type: ignore[no-untyped-def]
            return {"gpus": [{"index": 0, "name": "Fake GPU"}]}

    hooks.pm.register(Extra(), name="extra")
    hooks.pm.register(FakeGPUs(), name="fake-gpus")
    specs = hooks.collect_specs()
    assert specs["rack"] == "b4"
    assert specs["hostname"] == "overridden"  # a third-party part wins over the built-in
    assert specs["cpu"]["threads"] >= 1
    # The fake's GPUs replace whatever the machine's NVML reports (none, or real ones).
    assert specs["gpus"] == [{"index": 0, "name": "Fake GPU"}]


# -- p2prc_register_backends, p2prc_register_runners, p2prc_add_routes -------------------------

class FakeBackend:
    def images(self) -> list[dict[str, str]]:
        return [{"name": "p2prc/base:latest"}]


class Registrations:
    @hookimpl
    def p2prc_register_backends(self, register):  # type: ignore[no-untyped-def]
        register("toy", FakeBackend())

    @hookimpl
    def p2prc_register_runners(self, register):  # type: ignore[no-untyped-def]
        register("echo", object())

    @hookimpl
    def p2prc_add_routes(self, app):  # type: ignore[no-untyped-def]
        class Hello:
            def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
                """Say hello."""
                resp.media = {"hello": "world"}

        app.add_route("/v1/hello", Hello())


def test_register_backends_runners_and_routes(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hooks = make_plugin_manager(load_entrypoints=False,
                                plugins=[*BUILTINS, ("reg", Registrations())])
    assert list(hooks.backends()) == ["toy"]
    assert list(hooks.runners()) == ["echo"]
    client = testing.TestClient(create_app(NodeServices(settings, tmp_path, hooks)))
    assert client.simulate_get("/v1/hello").json == {"hello": "world"}
    assert client.simulate_get("/v1/images").json == {
        "images": [{"backend": "toy", "name": "p2prc/base:latest"}]}
    spec = client.simulate_get("/v1/openapi.json").json
    assert spec["paths"]["/v1/hello"]["get"]["summary"] == "Say hello."


def test_builtins_are_trylast() -> None:
    for _, module in BUILTINS:
        for name in dir(module):
            if name.startswith("p2prc_"):
                opts = getattr(module, name).p2prc_impl
                assert opts["trylast"], f"{module.__name__}.{name} must be trylast"


def test_sys_executable_has_p2prc() -> None:
    assert Path(P2PRC).exists(), f"p2prc is not installed beside {sys.executable}"


def test_the_core_never_imports_a_builtin_plugin() -> None:
    """Built-ins are plugins like any other: the core reaches them only through hooks, so
    P2PRC_DISABLE_PLUGINS really turns them off."""
    import ast

    core = Path(__file__).resolve().parent.parent / "p2prc_core"
    offenders = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("p2prc_plugins")]
    assert offenders == []
