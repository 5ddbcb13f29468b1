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

import hashlib
import json
import os
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
from typing import Any, Protocol, cast

from p2prc_core import pids
from p2prc_core.errors import P2PRCError, PeerError
from p2prc_core.models import Endpoint
from p2prc_core.my_containers import RemoteContainer, Tracked
from p2prc_core.storage import (
    atomic_write_json,
    locked,
    read_json_file,
    read_json_object,
    update_json,
)

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Variables that decide how or where Ansible connects, or that Ansible and p2prc set
# themselves: a bundle or -e must not set them (ansible_connection=local ran every task on
# the client while the container was reported ok).
_RESERVED = re.compile(r"(ansible_|p2prc_).*|hostvars|groups|group_names|inventory_.*|"
                       r"playbook_dir|role_path|omit|environment|vars")
# Keywords that make a task or play run somewhere other than the target containers.
_ELSEWHERE = ("delegate_to", "local_action", "connection")
GROUP = "p2prc"  # the inventory group of a run's containers; plays may name it or "all"
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
    playbook: str = "site.yml"  # the playbook file in ``path`` that a run starts with

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "ports": self.ports,
                "variables": self.variables, "path": str(self.path)}


def load_bundle(path: Path, playbook_file: str = "site.yml",
                default_name: str | None = None) -> Bundle:
    """Read and check a bundle directory. With ``default_name`` (a playbook run from its
    path), ``p2prc.toml`` may be missing: the bundle is then named that, needs no ports and
    has no variables of its own. :raises BundleError: with the reason."""
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory")
    manifest, playbook = path / "p2prc.toml", path / playbook_file
    if default_name is not None and not manifest.exists() and playbook.is_file():
        _check_playbook(playbook)
        return Bundle(default_name, "", 0, {}, path, playbook_file)
    for needed in (manifest, playbook):
        if not needed.is_file():
            raise BundleError(f"{path} has no {needed.name}: a bundle needs site.yml and "
                              f"p2prc.toml")
    try:
        data = tomllib.loads(manifest.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest}: not valid TOML: {err}") from None
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BundleError(f"{manifest}: name must be lower-case letters, digits, '-' or '_' "
                          f"(got {name!r})")
    description = data.get("description", "")
    ports = data.get("ports", 0)
    variables = data.get("variables", {})
    if not isinstance(description, str):
        raise BundleError(f"{manifest}: description must be a string")
    if not isinstance(ports, int) or isinstance(ports, bool) or not 0 <= ports <= 64:
        raise BundleError(f"{manifest}: ports must be a whole number from 0 to 64")
    if not isinstance(variables, dict) or not all(_VARIABLE.fullmatch(k) for k in variables):
        raise BundleError(f"{manifest}: [variables] must be a table of identifier = value")
    reserved = sorted(k for k in variables if _RESERVED.fullmatch(k))
    if reserved:
        raise BundleError(f"{manifest}: [variables] may not set {', '.join(reserved)}: they "
                          f"decide how and where Ansible connects, or are Ansible's own")
    unknown = sorted(set(data) - {"name", "description", "ports", "variables"})
    if unknown:
        raise BundleError(f"{manifest}: unknown keys {unknown}")
    _check_playbook(playbook)
    return Bundle(name, description, ports, variables, path, playbook_file)


# What makes Ansible run Python or read settings on this machine: refused in a bundle.
_CONTROLLER_PARTS = ("ansible.cfg", "library", "module_utils", "group_vars", "host_vars")
_DATA_FOLDERS = ("files", "templates")  # copied or templated into the containers, not run


def code_outside_the_containers(path: Path) -> list[str]:
    """Where a bundle would run something other than on the run's containers: Python for
    the controller (``*_plugins/``, ``library/``, ``module_utils/``, ``ansible.cfg``),
    variables Ansible reads on its own (``group_vars/``, ``host_vars/``), and in any file that
    reads as YAML (whatever its name, since any can be included), a ``delegate_to``,
    ``local_action`` or ``connection`` keyword, an ``ansible_*`` variable, or a play for
    hosts other than ``all`` or the p2prc group. Each finding says where. (The Ansible runner
    also forces the connection to SSH and limits every run to the p2prc group.)"""
    import yaml

    findings: list[str] = []

    def scan(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and (key in _ELSEWHERE or key.startswith("ansible_")):
                    findings.append(f"{where}: {key}")
                scan(value, where)
        elif isinstance(node, list):
            for item in node:
                scan(item, where)
        elif isinstance(node, str) and re.search(r"\bansible_\w+\s*=", node):
            findings.append(f"{where}: sets an ansible_ variable ({node[:40]!r})")

    for file in sorted(p for p in path.rglob("*") if ".git" not in p.parts):
        relative = file.relative_to(path)
        where = str(relative)
        if any(part in _CONTROLLER_PARTS or part.endswith("_plugins")
               for part in relative.parts):
            findings.append(f"{where}: runs or configures Ansible on this machine")
            continue
        if not file.is_file() or relative.parts[0] in _DATA_FOLDERS or file.name in (
                "p2prc.toml",) or file.stat().st_size > 1 << 20:
            continue
        try:
            documents = list(yaml.safe_load_all(file.read_text()))
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # not YAML: Ansible cannot read tasks or plays from it either
        for document in documents:
            scan(document, where)
            for play in document if isinstance(document, list) else []:
                hosts = play.get("hosts") if isinstance(play, dict) else None
                named = hosts if isinstance(hosts, list) else [hosts]
                if hosts is not None and not all(h in ("all", GROUP) for h in named):
                    findings.append(f"{where}: hosts: {hosts!r} (only 'all' or "
                                    f"'{GROUP}': the run's containers)")
    return findings


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
    """Installed bundles: ``$P2PRC_HOME/playbooks/NAME``. A bundle added from a folder
    follows that folder: ``run NAME`` installs it again first when it was edited since
    (``sources.json`` keeps each folder and what was installed from it)."""

    def __init__(self, home: Path):
        self.root = home / "playbooks"
        self.sources = self.root / ".sources.json"  # name -> {"source", "digest"}

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
        if not _NAME.fullmatch(name) or not path.is_dir():
            names = ", ".join(b.name for b in self.all()) or "none yet"
            raise BundleError(f"no playbook {name!r} (installed: {names}; add one with "
                              f"'p2prc playbooks add PATH_OR_GIT_URL', or run a playbook "
                              f"file or folder by its path: 'p2prc run ./site.yml')")
        return load_bundle(path)

    def add(self, source: str, replace: bool = False) -> Bundle:
        """Install a bundle from a directory or a git URL (cloned, shallow). Links that leave
        the bundle are refused, and its size is counted while it is copied.

        :raises BundleError: with the reason.
        """
        if source.startswith("-"):
            raise BundleError(f"{source!r} is not a directory or a git URL")
        with tempfile.TemporaryDirectory(prefix="p2prc-bundle-") as tmp:
            local = Path(source).expanduser()
            cloned = not local.exists() and _looks_like_git(source)
            if cloned:
                local = Path(tmp) / "clone"
                result = subprocess.run(["git", "clone", "--depth", "1", "--quiet", "--",
                                         source, str(local)], capture_output=True, text=True,
                                        timeout=300)
                if result.returncode != 0:
                    raise BundleError(f"git clone {source} failed: {result.stderr.strip()}")
            if not local.is_dir():
                raise BundleError(f"{source} is not a directory (or a git URL)")
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".staging.{secrets.token_hex(4)}"
            try:
                _copy_bundle(local, staging, source)
                bundle = load_bundle(staging)
                target = self.root / bundle.name
                if target.exists() and not replace:
                    raise BundleError(f"playbook {bundle.name!r} is installed already "
                                      f"(--replace to install this one instead)")
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._follow(bundle.name, None if cloned else local.resolve())
        return load_bundle(target)

    def remove(self, name: str) -> None:
        bundle = self.get(name)
        shutil.rmtree(bundle.path)
        self._follow(name, None)

    def for_run(self, name: str) -> tuple[Bundle, str]:
        """The bundle ``p2prc run NAME`` runs, and a note for the user (or ""): the folder it
        was added from when that was edited since (installed again first), else the
        installed copy (as edited, where it was edited in place).

        :raises BundleError: no such bundle; the edited folder is not a valid bundle now.
        """
        bundle = self.get(name)
        entry = read_json_object(self.sources).get(name)
        source = Path(entry["source"]) if isinstance(entry, dict) and isinstance(
            entry.get("source"), str) else None
        if source is None or not source.is_dir():
            return bundle, ""
        recorded = entry.get("digest") if isinstance(entry, dict) else None
        if folder_digest(source) == recorded:
            return bundle, ""
        if folder_digest(bundle.path) != recorded:
            return bundle, (f"playbook {name}: ran the installed copy, edited in "
                            f"{bundle.path}; {source} was edited too and is not followed "
                            f"('p2prc playbooks add --replace {source}' to take it)")
        edited = load_bundle(source)  # an edit that broke it says so, rather than run the old
        if edited.name != name:
            raise BundleError(f"{source} (playbook {name}) now names itself {edited.name!r}: "
                              f"'p2prc playbooks add {source}' installs it under that name")
        return self.add(str(source), replace=True), f"playbook {name}: ran as edited in {source}"

    def snapshot(self, path: str, into: Path) -> Bundle:
        """A playbook file or folder run by its path (``p2prc run ./site.yml``, as
        ``ansible-playbook site.yml``), copied into ``into`` as ``add`` would copy it.
        Its folder's ``p2prc.toml``, if any, names it and asks for ports; else it is named
        after the file (or its folder, for ``site.yml``).

        :raises BundleError: no such file or folder; not a playbook; what ``add`` refuses.
        """
        given = Path(path).expanduser()
        if given.is_file():
            folder, playbook_file = given.parent, given.name
        elif given.is_dir():
            folder, playbook_file = given, "site.yml"
        else:
            raise BundleError(f"no playbook {path!r}: no such file or folder here, and no "
                              f"installed playbook of that name ('p2prc playbooks ls')")
        stem = Path(playbook_file).stem
        named = folder.resolve().name if stem == "site" else stem
        try:
            _copy_bundle(folder, into, str(folder))
        except BundleError as err:
            raise BundleError(f"{err} (a playbook run by its path is copied with its "
                              f"folder, as 'playbooks add' copies one: give it a folder of "
                              f"its own)") from None
        return load_bundle(into, playbook_file, _as_name(named))

    def _follow(self, name: str, source: Path | None) -> None:
        """Remember the folder a bundle was installed from (None: none to follow)."""
        digest = folder_digest(self.root / name) if source is not None else None

        def change(sources: dict[str, Any]) -> None:
            if source is None:
                sources.pop(name, None)
            else:
                sources[name] = {"source": str(source), "digest": digest}

        update_json(self.sources, change)


def looks_like_a_path(text: str) -> bool:
    """Whether ``p2prc run TEXT`` names a playbook file or folder rather than an installed
    bundle: it has a '/', starts with '.' or '~', or ends in .yml or .yaml."""
    return "/" in text or os.sep in text or text.startswith((".", "~")) or \
        text.endswith((".yml", ".yaml"))


def _as_name(text: str) -> str:
    """A bundle name made from a file or folder name."""
    name = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:64]
    return name if _NAME.fullmatch(name) else "playbook"


def folder_digest(path: Path) -> str:
    """What a bundle folder holds, as one hash: each file's place and bytes, the way
    ``_copy_bundle`` copies it (no ``.git``, links to files read as those files)."""
    digest = hashlib.sha256()
    for directory, folders, files in os.walk(path, followlinks=False):
        folders[:] = sorted(f for f in folders if f != ".git")
        for name in sorted(files):
            file = Path(directory) / name
            if not file.is_file():
                continue
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            try:
                digest.update(hashlib.sha256(file.read_bytes()).digest())
            except OSError:
                digest.update(b"unreadable")
    return digest.hexdigest()


def _copy_bundle(source: Path, target: Path, shown: str) -> None:
    """Copy a bundle without following links out of it, and stop at MAX_BUNDLE_BYTES.

    A link to a file inside the bundle is copied as that file; any other link is refused
    (a link to ~/.p2prc/node.key would copy the node key into the bundle).
    """
    root, into = source.resolve(), target.resolve()  # a target inside is not copied
    total = 0
    for directory, folders, files in os.walk(source, followlinks=False):
        here = Path(directory)
        relative = here.relative_to(source)
        folders[:] = [f for f in folders if f != ".git" and (here / f).resolve() != into]
        for folder in list(folders):
            if (here / folder).is_symlink():
                raise BundleError(f"{shown}: {relative / folder} is a link to a directory: "
                                  f"bundles may not contain those")
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            path = here / name
            if path.is_symlink():
                resolved = path.resolve()
                if not resolved.is_relative_to(root) or not resolved.is_file():
                    raise BundleError(f"{shown}: {relative / name} links outside the bundle")
            elif not path.is_file():
                continue  # sockets, fifos: not part of a bundle
            total += path.stat().st_size
            if total > MAX_BUNDLE_BYTES:
                raise BundleError(f"{shown} is over {MAX_BUNDLE_BYTES} bytes")
            shutil.copyfile(path, target / relative / name)


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
    task: str = ""  # the task that failed, if one did
    ports: list[dict[str, Any]] = field(default_factory=list)  # handed: internal, external, at

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> HostResult:
        """A host's part of a run as its record keeps it, read back (``import p2prc``)."""
        return cls(name=name, container=str(data.get("container", "")),
                   status=str(data.get("status", "")), ok=int(data.get("ok", 0)),
                   changed=int(data.get("changed", 0)), failed=int(data.get("failed", 0)),
                   message=str(data.get("message", "")), task=str(data.get("task", "")),
                   ports=list(data.get("ports", [])))


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
    # When set, SSH reaches the container through this command (OpenSSH's ProxyCommand:
    # a tunnel through the host's p2prc port); ``address``/``port`` are then not dialled.
    proxy_command: str | None = None


class Runner(Protocol):
    """A task runner, registered through ``p2prc_register_runners``."""

    def run(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
            run_dir: Path, on_event: Event, confined: bool = True) -> RunResult:
        """Run ``bundle`` (its playbook file is ``bundle.playbook`` in ``bundle.path``) on
        every target at once; call ``on_event(host, task, status)`` as
        it goes; return each target's result under its ``name``. ``confined``: keep every
        task on the targets (not this machine), whatever the bundle says; False only when
        the user passed --allow-local."""
        ...


class NothingToRun(P2PRCError):
    """Not one of a run's containers still runs: there is nothing to run, and no record."""


class StartedRun(Protocol):
    """A run a runner has started but holds before it logs in anywhere."""

    def finish(self) -> RunResult:
        """Let it log in and run; its result, as ``Runner.run`` returns it."""
        ...

    def cancel(self) -> None:
        """End it before it logged in anywhere."""
        ...


class EarlyRunner(Runner, Protocol):
    """A runner that may also start before the last check of its targets (optional): its
    start-up then overlaps that check, and ``finish`` lets it go on."""

    def start(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
              run_dir: Path, on_event: Event, confined: bool = True) -> StartedRun:
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

    def discard(self, run_id: str) -> None:
        """Forget a run that never ran, and its folder."""
        shutil.rmtree(self.root / run_id, ignore_errors=True)

    def all(self) -> list[dict[str, Any]]:
        """Every run's record; one whose process ended before the run did (killed) reads
        ``state: killed``."""
        if not self.root.is_dir():
            return []
        records = []
        for path in sorted(self.root.iterdir()):
            record = read_json_file(path / "run.json", None)
            if isinstance(record, dict):
                records.append(_as_killed(record) if _died(record) else record)
        return records

    def killed(self) -> list[dict[str, Any]]:
        """The runs whose process died mid-run and that nobody has settled yet."""
        return [r for r in self.all() if r.get("state") == "killed" and r.get("ports_given")]

    def get(self, run_id: str) -> dict[str, Any]:
        """A run by id, a unique start of one, or ``last``."""
        every = self.all()
        if run_id == "last" and every:
            return max(every, key=lambda r: r.get("started", 0))
        matches = [r for r in every if r["id"].startswith(run_id)] if run_id else []
        if len(matches) != 1:
            raise P2PRCError(f"no run {run_id!r} ('p2prc runs ls' lists them)" if not matches
                             else f"{run_id!r} matches {len(matches)} runs")
        return matches[0]


class RunService:
    """Runs a bundle on tracked containers and groups: resolves the targets, hands out
    ports, calls the runner, and keeps the run's record."""

    def __init__(self, playbooks: Playbooks, tracked: Tracked, history: Runs,
                 runners: Callable[[], dict[str, Runner]], private_key: Callable[[], Path],
                 check_alive: Callable[[list[RemoteContainer]], None] = lambda found: None,
                 proxy: Callable[[RemoteContainer], str | None] = lambda found: None):
        self.playbooks = playbooks
        self.proxy = proxy  # how SSH reaches a container (None: its published port)
        self.tracked = tracked
        self.history = history
        self.runners = runners
        self.private_key = private_key
        self.check_alive = check_alive  # raises for a container its host no longer runs

    def run(self, playbook: str, on: list[str], variables: dict[str, Any],
            runner: str = "ansible", on_event: Event | None = None,
            allow_local: bool = False) -> dict[str, Any]:
        """Run ``playbook`` (an installed bundle's name, or the path of a playbook file or
        folder) on the containers and groups named in ``on``; return the run's record.
        A container its host no longer runs (or whose host cannot be asked) is not run on:
        the others are, and it is reported unreachable with the reason. Ports handed to a host
        that did not succeed are given back. A bundle whose YAML would run anything elsewhere
        than on the containers (see ``code_outside_the_containers``) runs only with
        ``allow_local``.

        :raises P2PRCError: an unknown playbook, container, group or runner; no targets, or
            none that still runs; a bundle that reaches outside its containers.
        """
        with tempfile.TemporaryDirectory(prefix="p2prc-playbook-") as scratch:
            bundle, origin = self._bundle(playbook, Path(scratch) / "bundle")
            _refuse_code_elsewhere(bundle, allow_local)
            containers = self._containers(on)
            runners = self.runners()
            if runner not in runners:
                raise P2PRCError(f"no task runner {runner!r} (have: "
                                 f"{', '.join(runners) or 'none'})")
            extravars = {**bundle.variables, **variables}
            private_key = self.private_key()
            self._settle_killed()
            early, alive, gone, (handed, newly) = self._take_ports(runners[runner], containers,
                                                                   bundle)
            run_id, run_dir = self._open_record(bundle, variables, newly)
            targets = [RunTarget(name=c.short_id, container_id=c.id, address=c.host,
                                 port=c.ssh_port, user="root", private_key=private_key,
                                 host_key=c.host_key, ports=handed[c.id],
                                 proxy_command=self.proxy(c)) for c in alive]
            started = time.time()
            try:
                result, alive, gone = self._launch(
                    runners[runner], early, bundle, containers, targets, gone, extravars,
                    run_dir, on_event or (lambda host, task, status: None), not allow_local,
                    (run_id, newly))
            except NothingToRun:
                self.tracked.release_ports(newly)
                self.history.discard(run_id)
                raise
            except BaseException:
                self.tracked.release_ports(newly)
                self.history.save(run_id, {**self.history.get(run_id), "state": "failed",
                                           "finished": time.time(), "ports_given": {}})
                raise
        failed = {c.id: newly[c.id] for c in alive
                  if result.hosts.get(c.short_id, HostResult(c.short_id, "")).status != "ok"}
        if failed:
            self.tracked.release_ports(failed)
        for container in alive:  # where each host's ports can be reached
            host = result.hosts.get(container.short_id)
            if host is not None:
                host.ports = [{**p, "at": Endpoint(container.host, p["external"]).address}
                              for p in handed[container.id]]
        result.hosts = {c.short_id: result.hosts.get(c.short_id) or HostResult(
            c.short_id, c.id, "unreachable", message=gone.get(c.id, "not run")[:400])
            for c in containers}
        record = {**record_of(run_id, bundle, result, started, extravars, run_dir), **origin}
        self.history.save(run_id, record)
        return record

    def _open_record(self, bundle: Bundle, variables: dict[str, Any],
                     newly: dict[str, list[dict[str, int]]]) -> tuple[str, Path]:
        """The run's record, written before it runs: a run whose process is killed shows as
        killed, and the next run gives its ports back (``_settle_killed``)."""
        try:
            run_id, run_dir = self.history.new()
            self.history.save(run_id, {
                "id": run_id, "playbook": bundle.name, "started": time.time(),
                "finished": None, "succeeded": False, "state": "running",
                "pid": os.getpid(), "pid_started": pids.started(os.getpid()),
                "variables": {**bundle.variables, **variables},
                "artifacts": str(run_dir), "hosts": {}, "ports_given": newly})
        except BaseException:
            self.tracked.release_ports(newly)
            raise
        return run_id, run_dir

    def _take_ports(self, chosen: Runner, containers: list[RemoteContainer], bundle: Bundle
                    ) -> tuple[bool, list[RemoteContainer], dict[str, str],
                               tuple[dict[str, list[dict[str, int]]],
                                     dict[str, list[dict[str, int]]]]]:
        """Whether ``chosen`` starts early (before the check of its targets, ``_launch``),
        the containers to run on and why the others are not, and their ports (handed, and
        newly taken). A runner that cannot start early, or a container with too few ports
        (it may be gone: the check says so), has the targets checked first."""
        if hasattr(chosen, "start"):
            try:
                return True, containers, {}, self.tracked.reserve_ports(
                    containers, bundle.ports, bundle.name)
            except P2PRCError:
                pass
        alive, gone = self._split_gone(containers)
        return False, alive, gone, self.tracked.reserve_ports(alive, bundle.ports, bundle.name)

    def _launch(self, chosen: Runner, early: bool, bundle: Bundle,
                containers: list[RemoteContainer], targets: list[RunTarget],
                gone: dict[str, str], extravars: dict[str, Any], run_dir: Path, event: Event,
                confined: bool, given: tuple[str, dict[str, list[dict[str, int]]]]
                ) -> tuple[RunResult, list[RemoteContainer], dict[str, str]]:
        """Run on the targets; the result, the containers run on and why the others were
        not. ``early``: ``chosen`` (an ``EarlyRunner``) starts before the targets are
        checked, goes on once all still run, and is ended, before it logged in anywhere,
        when one is gone (the rest then run as with any runner: checked first)."""
        begun = cast(EarlyRunner, chosen).start(bundle, targets, extravars, run_dir, event,
                                                confined=confined) if early else None
        try:
            for target in targets:
                event(target.name, "", "waiting")
            if begun is not None:
                alive, gone = self._split_gone(containers)
        except BaseException:
            if begun is not None:
                begun.cancel()
            raise
        if begun is not None:
            if not gone:
                return begun.finish(), alive, gone
            begun.cancel()
            self._give_back(gone, *given)
            targets = [t for t in targets if t.container_id not in gone]
        for container in containers:
            if container.id in gone:
                event(container.short_id, "", "unreachable")
        alive = [c for c in containers if c.id not in gone]
        return chosen.run(bundle, targets, extravars, run_dir, event, confined=confined), \
            alive, gone

    def _give_back(self, gone: dict[str, str], run_id: str,
                   newly: dict[str, list[dict[str, int]]]) -> None:
        """The ports handed to containers found gone, given back, and off the run's record
        (a run killed later must not give them back a second time)."""
        self.tracked.release_ports({cid: newly.pop(cid) for cid in gone if cid in newly})
        self.history.save(run_id, {**self.history.get(run_id), "ports_given": newly})

    def _settle_killed(self) -> None:
        """Give back the ports that runs killed mid-way were handed (they never ended to
        give them back), once."""
        with locked(self.history.root.parent / "runs-settle"):  # two runs never give one back twice
            for record in self.history.killed():
                given = record["ports_given"]
                if isinstance(given, dict):
                    self.tracked.release_ports({k: v for k, v in given.items()
                                                if isinstance(v, list)})
                self.history.save(record["id"], {**record, "ports_given": {}})

    def _bundle(self, playbook: str, scratch: Path) -> tuple[Bundle, dict[str, str]]:
        """The bundle to run, and what the record says of where it came from: ``source``
        (the path run, or the folder an installed bundle was refreshed from) and ``note``."""
        if looks_like_a_path(playbook) or (not (self.playbooks.root / playbook).is_dir()
                                           and Path(playbook).exists()):
            bundle = self.playbooks.snapshot(playbook, scratch)
            return bundle, {"source": str(Path(playbook).expanduser().resolve())}
        bundle, note = self.playbooks.for_run(playbook)
        return bundle, {"note": note} if note else {}

    def _containers(self, on: list[str]) -> list[RemoteContainer]:
        """The tracked containers that ``on`` names (ids and groups), each once."""
        containers: list[RemoteContainer] = []
        for name in on:
            for container in self.tracked.resolve(name):
                if container.id not in {c.id for c in containers}:
                    containers.append(container)
        if not containers:
            raise P2PRCError("no containers to run on (an empty group?)")
        return containers

    def _split_gone(self, containers: list[RemoteContainer]
                    ) -> tuple[list[RemoteContainer], dict[str, str]]:
        """The containers whose hosts still run them, and why each other one cannot be run
        on (its host removed it, or cannot be asked): one question per host, and one per
        container only on a host whose answer named a problem.

        :raises P2PRCError: not one of them can be run on (the first one's reason).
        """
        by_host: dict[str, list[RemoteContainer]] = {}
        for container in containers:
            by_host.setdefault(container.endpoint, []).append(container)
        gone: dict[str, str] = {}
        for members in by_host.values():
            try:
                self.check_alive(members)
                continue
            except PeerError as err:  # the host itself did not answer
                gone.update((c.id, str(err)) for c in members)
                continue
            except P2PRCError:
                pass
            for container in members:
                try:
                    self.check_alive([container])
                except P2PRCError as err:
                    gone[container.id] = str(err)
        alive = [c for c in containers if c.id not in gone]
        if not alive:
            reasons = [gone[c.id] for c in containers]
            raise NothingToRun(reasons[0] + (f" (and the other {len(reasons) - 1} cannot be "
                                             f"run on either)" if len(reasons) > 1 else ""))
        return alive, gone


def _refuse_code_elsewhere(bundle: Bundle, allow_local: bool) -> None:
    """:raises BundleError: the bundle would run something outside its containers, and the
    user did not pass --allow-local."""
    elsewhere = [] if allow_local else code_outside_the_containers(bundle.path)
    if elsewhere:
        raise BundleError(f"playbook {bundle.name!r} would run outside its containers ("
                          + "; ".join(elsewhere[:5])
                          + (f"; and {len(elsewhere) - 5} more" if len(elsewhere) > 5
                             else "")
                          + "): a bundle is code that runs on this machine; if you trust "
                            "it, pass --allow-local")


def _died(record: dict[str, Any]) -> bool:
    """A run still marked running whose process is gone."""
    return record.get("state") == "running" and "pid" in record and \
        not pids.alive(record["pid"], record.get("pid_started", 0))


def _as_killed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "state": "killed", "succeeded": False}


def record_of(run_id: str, bundle: Bundle, result: RunResult, started: float,
              extravars: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {"id": run_id, "playbook": bundle.name, "started": started,
            "finished": time.time(), "succeeded": result.succeeded,
            "state": "ok" if result.succeeded else "failed", "ports_given": {},
            "variables": extravars, "artifacts": str(run_dir),
            "hosts": {name: vars(host) for name, host in result.hosts.items()}}


def parse_variables(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that reads as JSON (a number, true, a list) is that."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _VARIABLE.fullmatch(key):
            raise BundleError(f"-e {pair!r}: expected KEY=VALUE")
        if _RESERVED.fullmatch(key):
            raise BundleError(f"-e {key}: may not be set: it decides how or where Ansible "
                              f"connects, or is Ansible's own")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found
