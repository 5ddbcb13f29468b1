"""Declarative tasks: playbook bundles, and runs of them across many containers.

A bundle is a directory with ``site.yml`` (an Ansible playbook) and ``p2prc.toml``::

    name = "http"
    description = "Serve a page on the first p2prc port"
    ports = 1                       # extra container ports the bundle needs
    [variables]                     # defaults; 'p2prc run -e KEY=VALUE' overrides
    message = "hello"

The run itself is a runner's (``p2prc_register_runners``; Ansible is built in).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2prc_core.errors import P2PRCError
from p2prc_core.storage import atomic_write_json, read_json_file
from p2prc_core.tracking import RemoteContainer, Tracked

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_BUNDLE_BYTES = 50 << 20


class BundleError(P2PRCError):
    """A bundle that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Bundle:
    name: str
    description: str
    ports: int
    variables: dict[str, Any]
    path: Path

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "ports": self.ports,
                "variables": self.variables, "path": str(self.path)}


def load_bundle(path: Path) -> Bundle:
    """Read and check a bundle directory. :raises BundleError: with the reason."""
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory")
    manifest, playbook = path / "p2prc.toml", path / "site.yml"
    for needed in (manifest, playbook):
        if not needed.is_file():
            raise BundleError(f"{path} has no {needed.name}: a bundle needs site.yml and "
                              f"p2prc.toml")
    try:
        data = tomllib.loads(manifest.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest}: not valid TOML: {err}") from None
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BundleError(f"{manifest}: name must be lower-case letters, digits, '-' or '_' "
                          f"(got {name!r})")
    description = data.get("description", "")
    ports = data.get("ports", 0)
    variables = data.get("variables", {})
    if not isinstance(description, str):
        raise BundleError(f"{manifest}: description must be a string")
    if not isinstance(ports, int) or isinstance(ports, bool) or not 0 <= ports <= 64:
        raise BundleError(f"{manifest}: ports must be a whole number from 0 to 64")
    if not isinstance(variables, dict) or not all(_VARIABLE.match(k) for k in variables):
        raise BundleError(f"{manifest}: [variables] must be a table of identifier = value")
    unknown = sorted(set(data) - {"name", "description", "ports", "variables"})
    if unknown:
        raise BundleError(f"{manifest}: unknown keys {unknown}")
    _check_playbook(playbook)
    return Bundle(name, description, ports, variables, path)


def _check_playbook(path: Path) -> None:
    import yaml  # comes with ansible-core

    try:
        plays = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(plays, list) or not plays or not all(
            isinstance(p, dict) and ("hosts" in p or "import_playbook" in p) for p in plays):
        raise BundleError(f"{path}: a playbook is a list of plays, each with 'hosts'")


class Playbooks:
    """Installed bundles: ``$P2PRC_HOME/playbooks/NAME``."""

    def __init__(self, home: Path):
        self.root = home / "playbooks"

    def all(self) -> list[Bundle]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            try:
                found.append(load_bundle(path))
            except BundleError:
                continue  # a damaged install is not listed; 'add' again to mend it
        return found

    def get(self, name: str) -> Bundle:
        path = self.root / name
        if not _NAME.match(name) or not path.is_dir():
            names = ", ".join(b.name for b in self.all()) or "none yet"
            raise BundleError(f"no playbook {name!r} (installed: {names}; add one with "
                              f"'p2prc playbooks add PATH_OR_GIT_URL')")
        return load_bundle(path)

    def add(self, source: str, replace: bool = False) -> Bundle:
        """Install a bundle from a directory or a git URL (cloned, shallow)."""
        with tempfile.TemporaryDirectory(prefix="p2prc-bundle-") as tmp:
            local = Path(source).expanduser()
            if not local.exists() and _looks_like_git(source):
                local = Path(tmp) / "clone"
                result = subprocess.run(["git", "clone", "--depth", "1", "--quiet", source,
                                         str(local)], capture_output=True, text=True,
                                        timeout=300)
                if result.returncode != 0:
                    raise BundleError(f"git clone {source} failed: {result.stderr.strip()}")
            bundle = load_bundle(local)
            size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
            if size > MAX_BUNDLE_BYTES:
                raise BundleError(f"{source} is {size} bytes, over {MAX_BUNDLE_BYTES}")
            target = self.root / bundle.name
            if target.exists() and not replace:
                raise BundleError(f"playbook {bundle.name!r} is installed already "
                                  f"(--replace to install this one instead)")
            staging = self.root / f".{bundle.name}.{secrets.token_hex(4)}"
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, staging, ignore=shutil.ignore_patterns(".git"))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        return load_bundle(target)

    def remove(self, name: str) -> None:
        bundle = self.get(name)
        shutil.rmtree(bundle.path)


def _looks_like_git(source: str) -> bool:
    return source.startswith(("http://", "https://", "git@", "ssh://", "file://")) or \
        source.endswith(".git")


# -- runs ---------------------------------------------------------------------------------------

@dataclass
class HostResult:
    name: str
    container: str
    status: str = "pending"  # ok, failed, unreachable
    ok: int = 0
    changed: int = 0
    failed: int = 0
    message: str = ""


@dataclass
class RunResult:
    hosts: dict[str, HostResult] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return bool(self.hosts) and all(h.status == "ok" for h in self.hosts.values())


Event = Callable[[str, str, str], None]  # host, task, status


@dataclass(frozen=True)
class RunTarget:
    """One container a run works on, as a runner needs it: how to log in over SSH (with the
    host key pinned) and the extra ports handed to this run."""

    name: str  # the host's name in events and results: the short container id
    container_id: str
    address: str
    port: int
    user: str
    private_key: Path
    host_key: str  # one OpenSSH public key line, pinned
    ports: list[dict[str, int]]  # [{"internal", "external"}]


class Runner(Protocol):
    """A task runner, registered through ``p2prc_register_runners``."""

    def run(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
            run_dir: Path, on_event: Event) -> RunResult:
        """Run ``bundle`` on every target at once; call ``on_event(host, task, status)`` as
        it goes; return each target's result under its ``name``."""
        ...


class Runs:
    """Each run's record and artifacts: ``$P2PRC_HOME/runs/RUN``."""

    def __init__(self, home: Path):
        self.root = home / "runs"

    def new(self) -> tuple[str, Path]:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        path = self.root / run_id
        path.mkdir(parents=True)
        return run_id, path

    def save(self, run_id: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.root / run_id / "run.json", record)

    def all(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        records = []
        for path in sorted(self.root.iterdir()):
            record = read_json_file(path / "run.json", None)
            if isinstance(record, dict):
                records.append(record)
        return records

    def get(self, run_id: str) -> dict[str, Any]:
        matches = [r for r in self.all() if r["id"].startswith(run_id)] if run_id else []
        if len(matches) != 1:
            raise P2PRCError(f"no run {run_id!r} ('p2prc runs ls' lists them)" if not matches
                             else f"{run_id!r} matches {len(matches)} runs")
        return matches[0]


class RunService:
    """Runs a bundle on tracked containers and groups: resolves the targets, hands out
    ports, calls the runner, and keeps the run's record."""

    def __init__(self, playbooks: Playbooks, tracked: Tracked, history: Runs,
                 runners: Callable[[], dict[str, Runner]], private_key: Callable[[], Path],
                 check_alive: Callable[[list[RemoteContainer]], None] = lambda found: None):
        self.playbooks = playbooks
        self.tracked = tracked
        self.history = history
        self.runners = runners
        self.private_key = private_key
        self.check_alive = check_alive  # raises for a container its host no longer runs

    def run(self, playbook: str, on: list[str], variables: dict[str, Any],
            runner: str = "ansible", on_event: Event | None = None) -> dict[str, Any]:
        """Run ``playbook`` on the containers and groups named in ``on``; return the run's
        record. Ports handed to a host that did not succeed are given back.

        :raises P2PRCError: an unknown playbook, container, group or runner; no targets.
        """
        bundle = self.playbooks.get(playbook)
        containers: list[RemoteContainer] = []
        for name in on:
            for container in self.tracked.resolve(name):
                if container.id not in {c.id for c in containers}:
                    containers.append(container)
        if not containers:
            raise P2PRCError("no containers to run on (an empty group?)")
        runners = self.runners()
        if runner not in runners:
            raise P2PRCError(f"no task runner {runner!r} (have: {', '.join(runners) or 'none'})")
        extravars = {**bundle.variables, **variables}
        private_key = self.private_key()
        self.check_alive(containers)
        handed = self.tracked.reserve_ports(containers, bundle.ports)
        targets = [RunTarget(name=c.short_id, container_id=c.id, address=c.host,
                             port=c.ssh_port, user="root", private_key=private_key,
                             host_key=c.host_key, ports=handed[c.id]) for c in containers]
        event = on_event or (lambda host, task, status: None)
        started = time.time()
        try:
            for target in targets:
                event(target.name, "", "waiting")
            run_id, run_dir = self.history.new()
            result = runners[runner].run(bundle, targets, extravars, run_dir, event)
        except BaseException:
            self.tracked.release_ports(handed)
            raise
        failed = {t.container_id: handed[t.container_id] for t in targets
                  if result.hosts.get(t.name, HostResult(t.name, "")).status != "ok"}
        if failed:
            self.tracked.release_ports(failed)
        record = record_of(run_id, bundle, result, started, extravars, run_dir)
        self.history.save(run_id, record)
        return record


def record_of(run_id: str, bundle: Bundle, result: RunResult, started: float,
              extravars: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {"id": run_id, "playbook": bundle.name, "started": started,
            "finished": time.time(), "succeeded": result.succeeded,
            "variables": extravars, "artifacts": str(run_dir),
            "hosts": {name: vars(host) for name, host in result.hosts.items()}}


def parse_variables(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that reads as JSON (a number, true, a list) is that."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _VARIABLE.match(key):
            raise BundleError(f"-e {pair!r}: expected KEY=VALUE")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found
