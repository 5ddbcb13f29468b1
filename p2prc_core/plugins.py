"""The plugin manager: one factory, and a typed facade over ``pm.hook``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from p2prc_core import PROJECT_NAME, __version__, hookspecs
from p2prc_core.entry_points import entry_points

if TYPE_CHECKING:
    import falcon

    from p2prc_core.containers import Backend
    from p2prc_core.models import Address, KnownPeer
    from p2prc_core.tasks import Runner

ENTRY_POINT_GROUP = PROJECT_NAME
T = TypeVar("T")


class PluginLoadError(Exception):
    """One or more plugins could not be loaded; the message names each and the cause."""

    def __init__(self, failures: Sequence[PluginFailure]):
        self.failures = list(failures)
        lines = [str(f) for f in self.failures]
        names = ",".join(f.name for f in self.failures)
        hint = f" (to start without it: P2PRC_DISABLE_PLUGINS={names})"
        super().__init__("; ".join(lines) + hint)


@dataclass(frozen=True)
class PluginFailure:
    name: str
    distribution: str
    version: str
    cause: str

    def __str__(self) -> str:
        origin = f"{self.distribution} {self.version}".strip()
        return f"plugin {self.name!r} from {origin} failed to load: {self.cause}"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution,
                "version": self.version, "hooks": list(self.hooks)}


def _cause(err: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def make_plugin_manager(disabled: Iterable[str] = (), load_entrypoints: bool = True,
                        plugins: Iterable[tuple[str, object]] = (),
                        home: Path | None = None) -> PluginHooks:
    """Build and check a plugin manager.

    :param disabled: plugin names to block (``P2PRC_DISABLE_PLUGINS``).
    :param load_entrypoints: load the ``p2prc`` entry-point group (built-ins included).
    :param plugins: extra ``(name, module_or_object)`` pairs to register, as tests do.
    :param home: where the entry points found are kept for the next start
        (``entry_points``).
    :raises PluginLoadError: when a plugin fails to import or to validate.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    origins: dict[str, tuple[str, str]] = {}
    failures: list[PluginFailure] = []

    candidates: list[tuple[str, str, str, Any]] = []
    if load_entrypoints:
        for ep in entry_points(ENTRY_POINT_GROUP, home):
            dist, version = ep.distribution, ep.version
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                obj = ep.load()
            except Exception as err:  # a broken plugin must not take the node down silently
                failures.append(PluginFailure(ep.name, dist, version, _cause(err)))
                continue
            candidates.append((ep.name, dist, version, obj))
    for name, obj in plugins:
        candidates.append((name, "(registered directly)", "", obj))

    for name, dist, version, obj in candidates:
        if pm.is_blocked(name):
            continue
        try:
            pm.register(obj, name=name)
        except (pluggy.PluginValidationError, ValueError) as err:
            failures.append(PluginFailure(name, dist, version, _cause(err)))
            continue
        origins[name] = (dist, version)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        bad = err.plugin
        name = pm.get_name(bad) or "?"
        dist, version = origins.get(name, ("unknown distribution", "?"))
        failures.append(PluginFailure(name, dist, version, _cause(err)))
    if failures:
        raise PluginLoadError(failures)
    return PluginHooks(pm, origins)


class PluginHooks:
    """Typed facade: one method per hook, so callers get checked signatures."""

    def __init__(self, pm: pluggy.PluginManager, origins: dict[str, tuple[str, str]]):
        self.pm = pm
        self._origins = origins

    def select_address(self, candidates: Sequence[Address], purpose: str) -> Address | None:
        result: Address | None = self.pm.hook.p2prc_select_address(
            candidates=list(candidates), purpose=purpose)
        return result

    def score_peer(self, peer: KnownPeer) -> float:
        """The sum of every plugin's score for ``peer``; higher is better."""
        parts = self.pm.hook.p2prc_score_peer(peer=peer)
        return float(sum(p for p in parts if p is not None))

    def rank_peers(self, peers: Iterable[KnownPeer]) -> list[KnownPeer]:
        """Peers best first; ties keep their order."""
        return [p for p, _ in self.ranked(peers)]

    def ranked(self, peers: Iterable[KnownPeer]) -> list[tuple[KnownPeer, float]]:
        """Peers best first, each with its score; ties keep their order."""
        scored = [(self.score_peer(p), i, p) for i, p in enumerate(peers)]
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [(p, score) for score, _, p in scored]

    def collect_specs(self) -> dict[str, Any]:
        """Every plugin's part merged; a plugin called earlier (third-party) wins a clash."""
        merged: dict[str, Any] = {}
        for part in reversed(self.pm.hook.p2prc_collect_specs()):
            if part:
                merged.update(part)
        return merged

    def backends(self) -> dict[str, Backend]:
        """Every registered virtualization backend by name."""
        found: dict[str, Backend] = {}
        self.pm.hook.p2prc_register_backends(register=_registrar(found, "backend"))
        return found

    def runners(self) -> dict[str, Runner]:
        """Every registered task runner by name."""
        found: dict[str, Runner] = {}
        self.pm.hook.p2prc_register_runners(register=_registrar(found, "runner"))
        return found

    def add_routes(self, app: falcon.App) -> None:
        self.pm.hook.p2prc_add_routes(app=app)

    def plugin_info(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version = self._origins.get(name, (PROJECT_NAME, __version__))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            infos.append(PluginInfo(name, dist, version, hooks))
        return sorted(infos, key=lambda i: (i.distribution != PROJECT_NAME, i.name))


def _registrar(found: dict[str, T], what: str) -> Callable[[str, T], None]:
    def register(name: str, obj: T) -> None:
        # Plugins are called third-party first: the first to claim a name keeps it.
        found.setdefault(name, obj)
    register.__doc__ = f"Register a {what} under ``name``."
    return register
