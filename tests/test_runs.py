"""Run orchestration without Ansible: a fake runner, registered through
``p2prc_register_runners``, behind the real run service (targets, ports, records). Real
Ansible against real containers is tested in test_tasks.py."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import BUILTINS
from p2prc_core import hookimpl
from p2prc_core.config import Settings
from p2prc_core.errors import P2PRCError
from p2prc_core.models import Endpoint
from p2prc_core.my_containers import RemoteContainer
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.services import NodeServices
from p2prc_core.tasks import Bundle, Event, HostResult, RunResult, RunTarget
from p2prc_plugins.ansible import build_inventory

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "playbooks"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"


class FakeRunner:
    """Says each host's result as told; remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[RunTarget], dict[str, Any]]] = []
        self.fail: set[str] = set()
        self.crash: Exception | None = None
        self.bundles: list[tuple[Bundle, str]] = []  # each bundle, and its playbook as run

    def run(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
            run_dir: Path, on_event: Event, confined: bool = True) -> RunResult:
        self.calls.append((bundle.name, targets, extravars))
        self.bundles.append((bundle, (bundle.path / bundle.playbook).read_text()))
        if self.crash is not None:
            raise self.crash
        result = RunResult()
        for target in targets:
            failed = target.container_id in self.fail
            on_event(target.name, "serve", "failed" if failed else "ok")
            result.hosts[target.name] = HostResult(
                target.name, target.container_id, "failed" if failed else "ok",
                ok=0 if failed else 2, failed=1 if failed else 0,
                message="port in use" if failed else "")
        return result


class EarlyFakeRunner(FakeRunner):
    """Also starts early (``EarlyRunner``): what it was told, in order, with whether the
    hosts had been asked by then."""

    def __init__(self, asked: list[list[str]]) -> None:
        super().__init__()
        self.asked = asked  # the hosts' answers, as the test's check_alive records them
        self.log: list[tuple[str, int]] = []
        self.records: list[dict[str, Any]] = []

    def run(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
            run_dir: Path, on_event: Event, confined: bool = True) -> RunResult:
        self.records.append(json.loads((run_dir / "run.json").read_text()))  # as it ran
        return super().run(bundle, targets, extravars, run_dir, on_event, confined)

    def start(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
              run_dir: Path, on_event: Event, confined: bool = True) -> Any:
        self.log.append(("start", len(self.asked)))
        runner = self

        class Started:
            def finish(self) -> RunResult:
                runner.log.append(("finish", len(runner.asked)))
                return runner.run(bundle, targets, extravars, run_dir, on_event, confined)

            def cancel(self) -> None:
                runner.log.append(("cancel", len(runner.asked)))

        return Started()


class FakeRunnerPlugin:
    def __init__(self, runner: FakeRunner, early: EarlyFakeRunner | None = None):
        self.runner = runner
        self.early = early or EarlyFakeRunner([])

    @hookimpl
    def p2prc_register_runners(self, register: Callable[[str, Any], None]) -> None:
        register("fake", self.runner)
        register("early", self.early)


def container(index: int, extra_ports: int = 2) -> RemoteContainer:
    ssh = 42000 + index * 10
    return RemoteContainer(
        id=f"{index:x}" * 64 if index < 16 else f"{index:064x}",
        endpoint="[fd42::1]:8088", host="fd42::1", ssh_port=ssh, host_key=HOST_KEY,
        ports=[{"name": "ssh", "internal": 22, "external": ssh}]
        + [{"name": f"port{i}", "internal": ssh + i, "external": ssh + i}
           for i in range(1, extra_ports + 1)],
        image="p2prc/base:latest", created=1.0, expires=2.0)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def node(tmp_path: Path, runner: FakeRunner) -> NodeServices:
    asked: list[list[str]] = []
    early = EarlyFakeRunner(asked)
    hooks = make_plugin_manager(load_entrypoints=False, plugins=[
        *BUILTINS, ("fake-runner", FakeRunnerPlugin(runner, early))])
    services = NodeServices(Settings(), tmp_path / "home", hooks)
    services.early = early  # type: ignore[attr-defined]
    # Whether the hosts still run these containers is asked over the network; here every
    # one runs, but those named in `gone` (the real check is tested against real hosts).
    services.gone = set()  # type: ignore[attr-defined]

    def check_alive(containers: list[RemoteContainer]) -> None:
        asked.append([c.short_id for c in containers])
        for c in containers:
            if c.id in services.gone:  # type: ignore[attr-defined]
                raise P2PRCError(f"{c.short_id} is gone from {c.endpoint}")

    services.on_peers.check_alive = check_alive  # type: ignore[method-assign]
    services.playbooks.add(str(CONTRIB / "http"))
    for index in (1, 2):
        services.tracked.add(container(index))
    services.tracked.create_group("web")
    for index in (1, 2):
        services.tracked.change_group("web", container(index).id, add=True)
    return services


def test_a_run_hands_each_target_its_login_and_unused_ports(node: NodeServices,
                                                            runner: FakeRunner) -> None:
    events: list[tuple[str, str, str]] = []
    record = node.runs.run("http", ["web"], {"message": "hi"}, "fake",
                           lambda *event: events.append(event))
    [(name, targets, extravars)] = runner.calls
    assert name == "http" and extravars["message"] == "hi"
    first = targets[0]
    assert (first.name, first.address, first.port, first.user, first.host_key) == \
        (container(1).short_id, "fd42::1", 42010, "root", HOST_KEY)
    assert first.private_key == node.on_peers.ssh_key()[0] and first.private_key.exists()
    assert first.ports == [{"internal": 42011, "external": 42011}]
    assert events[:2] == [(t.name, "", "waiting") for t in targets]
    assert record["succeeded"] and set(record["hosts"]) == {t.name for t in targets}
    assert node.runs.history.get(record["id"][:10]) == record  # kept, found by prefix
    # A re-run of the same playbook serves on the same port; the record says which.
    again = node.runs.run("http", [container(1).id], {}, "fake")
    assert runner.calls[1][1][0].ports == [{"internal": 42011, "external": 42011}]
    assert again["hosts"][first.name]["ports"] == [
        {"internal": 42011, "external": 42011, "at": "[fd42::1]:42011"}]
    assert node.runs.history.get("last")["id"] == again["id"]


def test_other_playbooks_get_unused_ports_until_none_is_left(node: NodeServices,
                                                             runner: FakeRunner) -> None:
    import shutil

    for name in ("http2", "http3"):  # the same bundle under other names
        copy = node.home / "src" / name
        shutil.copytree(CONTRIB / "http", copy)
        toml = copy / "p2prc.toml"
        toml.write_text(toml.read_text().replace('name = "http"', f'name = "{name}"'))
        node.playbooks.add(str(copy))
    for _ in range(3):  # re-runs never eat ports
        node.runs.run("http", ["web"], {}, "fake")
    node.runs.run("http2", ["web"], {}, "fake")
    assert runner.calls[-1][1][0].ports == [{"internal": 42012, "external": 42012}]
    with pytest.raises(P2PRCError, match="0 unused extra ports; the playbook needs 1"):
        node.runs.run("http3", ["web"], {}, "fake")


def test_ports_handed_to_a_host_that_failed_are_released(node: NodeServices,
                                                         runner: FakeRunner) -> None:
    runner.fail = {container(2).id}
    record = node.runs.run("http", ["web"], {}, "fake")
    assert not record["succeeded"]
    assert record["hosts"][container(2).short_id]["message"] == "port in use"
    tracked = node.tracked.containers()
    assert tracked[container(1).id].used_ports == [42011]  # kept: it is serving there
    assert tracked[container(2).id].used_ports == []  # given back
    runner.fail = set()
    node.runs.run("http", ["web"], {}, "fake")
    assert runner.calls[1][1][1].ports == [{"internal": 42021, "external": 42021}]


def test_a_runner_that_crashes_gives_every_port_back(node: NodeServices,
                                                     runner: FakeRunner) -> None:
    runner.crash = RuntimeError("runner broke")
    with pytest.raises(RuntimeError, match="runner broke"):
        node.runs.run("http", ["web"], {}, "fake")
    assert all(c.used_ports == [] for c in node.tracked.containers().values())


@pytest.mark.parametrize("playbook, on, runner_name, words", [
    ("nope", ["web"], "fake", "no playbook 'nope'"),
    ("http", ["nobody"], "fake", "no tracked container 'nobody'"),
    ("http", ["web"], "chef", "no task runner 'chef' (have: fake, early)"),
])
def test_what_cannot_run_is_a_clear_error(node: NodeServices, runner: FakeRunner,
                                          playbook: str, on: list[str], runner_name: str,
                                          words: str) -> None:
    with pytest.raises(P2PRCError, match=re.escape(words)):
        node.runs.run(playbook, on, {}, runner_name)
    assert runner.calls == []
    assert all(c.used_ports == [] for c in node.tracked.containers().values())


def test_a_container_that_is_gone_is_not_run_on(node: NodeServices, runner: FakeRunner) -> None:
    """The rest of its group is (as Ansible goes on past an unreachable host); it is
    reported unreachable with the reason, and the run did not succeed."""
    node.gone = {container(2).id}  # type: ignore[attr-defined]
    events: list[tuple[str, str, str]] = []
    record = node.runs.run("http", ["web"], {}, "fake", lambda *event: events.append(event))
    [(_, targets, _)] = runner.calls
    assert [t.container_id for t in targets] == [container(1).id]
    assert not record["succeeded"]
    assert list(record["hosts"]) == [container(1).short_id, container(2).short_id]
    assert record["hosts"][container(1).short_id]["status"] == "ok"
    gone = record["hosts"][container(2).short_id]
    assert gone["status"] == "unreachable"
    assert f"{container(2).short_id} is gone" in gone["message"]
    assert (container(2).short_id, "", "unreachable") in events
    tracked = node.tracked.containers()
    assert tracked[container(1).id].used_ports == [42011]
    assert tracked[container(2).id].used_ports == []  # none handed to what was not run
    assert node.runs.history.get("last") == record
    # When none of them runs any more, there is nothing to run: one clear error.
    node.gone = {container(1).id, container(2).id}  # type: ignore[attr-defined]
    with pytest.raises(P2PRCError, match=f"{container(1).short_id} is gone.*and the other 1"):
        node.runs.run("http", ["web"], {}, "fake")
    assert len(runner.calls) == 1


@pytest.fixture
def early(node: NodeServices) -> EarlyFakeRunner:
    return node.early  # type: ignore[attr-defined, no-any-return]


def test_a_runner_that_starts_early_goes_on_only_once_the_hosts_said_yes(
        node: NodeServices, early: EarlyFakeRunner) -> None:
    record = node.runs.run("http", ["web"], {}, "early")
    # Started before the hosts were asked, let go after: never the other way round.
    assert early.log == [("start", 0), ("finish", 1)]
    assert record["succeeded"] and len(early.calls) == 1


def test_a_runner_that_started_early_is_ended_when_one_is_gone(
        node: NodeServices, early: EarlyFakeRunner) -> None:
    """The early start is cancelled before it logs in; the rest run as before, and what was
    handed to the gone one is given back."""
    node.gone = {container(2).id}  # type: ignore[attr-defined]
    events: list[tuple[str, str, str]] = []
    record = node.runs.run("http", ["web"], {}, "early", lambda *event: events.append(event))
    assert [step for step, _ in early.log] == ["start", "cancel"]
    [(_, targets, _)] = early.calls  # the later run, on what still runs
    assert [t.container_id for t in targets] == [container(1).id]
    assert record["hosts"][container(2).short_id]["status"] == "unreachable"
    assert (container(2).short_id, "", "unreachable") in events
    tracked = node.tracked.containers()
    assert tracked[container(1).id].used_ports == [42011]
    assert tracked[container(2).id].used_ports == []
    # What it gave back is off the record at once: a kill now would not give it back again.
    assert list(early.records[0]["ports_given"]) == [container(1).id]
    # None left: the start is ended, one clear error, no record, nothing kept taken.
    node.gone = {container(1).id, container(2).id}  # type: ignore[attr-defined]
    early.log.clear()
    with pytest.raises(P2PRCError, match="is gone.*and the other 1"):
        node.runs.run("http", ["web"], {}, "early")
    assert [step for step, _ in early.log] == ["start", "cancel"] and len(early.calls) == 1
    assert node.runs.history.get("last") == record
    assert len(list(node.runs.history.root.iterdir())) == 1
    assert node.tracked.containers()[container(1).id].used_ports == [42011]  # its own run's


def test_a_runner_started_early_is_ended_when_the_caller_stops(
        node: NodeServices, early: EarlyFakeRunner) -> None:
    """A Ctrl-C (or an error in the caller's progress display) before the hosts answered:
    the early start is ended, never left waiting."""
    def interrupt(*event: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        node.runs.run("http", ["web"], {}, "early", interrupt)
    assert [step for step, _ in early.log] == ["start", "cancel"] and not early.calls
    assert all(c.used_ports == [] for c in node.tracked.containers().values())
    assert node.runs.history.get("last")["state"] == "failed"


def test_a_container_short_of_ports_is_checked_before_anything_starts(
        node: NodeServices, early: EarlyFakeRunner) -> None:
    """Too few ports left on one (it may be gone): no early start; the check comes first,
    and a gone one is reported as such, the rest run."""
    short = container(3, extra_ports=0)
    node.tracked.add(short)
    node.gone = {short.id}  # type: ignore[attr-defined]
    record = node.runs.run("http", [container(1).id, short.id], {}, "early")
    assert early.log == []  # not started early
    assert [t.container_id for t in early.calls[0][1]] == [container(1).id]
    assert f"{short.short_id} is gone" in record["hosts"][short.short_id]["message"]


def test_a_host_that_cannot_be_asked_marks_its_containers_unreachable(
        node: NodeServices, runner: FakeRunner) -> None:
    from p2prc_core.errors import PeerError

    other = RemoteContainer(**{**vars(container(3)), "endpoint": "[fd42::9]:8088"})
    node.tracked.add(other)
    asked: list[list[str]] = []

    def check_alive(containers: list[RemoteContainer]) -> None:
        asked.append([c.id for c in containers])
        if containers[0].endpoint == other.endpoint:
            raise PeerError("cannot reach [fd42::9]:8088: Network is unreachable")

    node.runs.check_alive = check_alive
    record = node.runs.run("http", ["web", other.id], {}, "fake")
    assert record["hosts"][other.short_id]["status"] == "unreachable"
    assert "Network is unreachable" in record["hosts"][other.short_id]["message"]
    assert [t.container_id for t in runner.calls[0][1]] == [container(1).id, container(2).id]
    assert len(asked) == 2  # one question per host


def test_an_empty_group_is_a_clear_error(node: NodeServices) -> None:
    node.tracked.create_group("empty")
    with pytest.raises(P2PRCError, match="no containers to run on"):
        node.runs.run("http", ["empty"], {}, "fake")


@pytest.mark.parametrize("name", ["web\n", "web\nall", "", "1web", "a" * 65, "web;id"])
def test_a_group_name_is_checked_whole(node: NodeServices, name: str) -> None:
    with pytest.raises(P2PRCError, match="is not a group name"):
        node.tracked.create_group(name)
    assert name not in node.tracked.groups()


def test_the_ansible_inventory_pins_host_keys_and_hands_out_ports(tmp_path: Path) -> None:
    targets = [RunTarget(name=c.short_id, container_id=c.id, address=c.host, port=c.ssh_port,
                         user="root", private_key=tmp_path / "key", host_key=c.host_key,
                         ports=[{"internal": 7, "external": 7}])
               for c in (container(1), container(2))]
    run_dir = tmp_path / "run"
    inventory = build_inventory(targets, run_dir)
    hosts = inventory["all"]["children"]["p2prc"]["hosts"]
    assert list(hosts) == [t.name for t in targets]
    for target, port in zip(targets, (42010, 42020), strict=True):
        host = hosts[target.name]
        assert (host["ansible_host"], host["ansible_port"], host["ansible_user"]) == \
            ("fd42::1", port, "root")
        assert "StrictHostKeyChecking=yes" in host["ansible_ssh_common_args"]
        assert host["p2prc_ports"] == [{"internal": 7, "external": 7}]
        # One known_hosts per container: a key pinned for one never vouches for another.
        known_hosts = run_dir / f"known_hosts_{target.name}"
        assert f"UserKnownHostsFile={known_hosts}" in host["ansible_ssh_common_args"]
        assert known_hosts.read_text() == f"[fd42::1]:{port} {HOST_KEY}\n"


def test_a_container_reply_is_checked_before_it_is_kept() -> None:
    from p2prc_core.errors import PeerError

    good = {"id": "a" * 64, "node_id": "x", "image": "p2prc/base:latest", "created": 1,
            "expires": 2, "gpu": False,
            "ports": [{"name": "ssh", "internal": 22, "external": 42000}],
            "ssh": {"port": 42000, "host_key": HOST_KEY}}
    endpoint = Endpoint("fd42::1", 8088)
    kept = RemoteContainer.from_reply(good, endpoint)
    assert RemoteContainer.from_reply({**good, "gpus": [1, 0, 1]}, endpoint).gpus == [0, 1]
    assert (kept.id, kept.host, kept.ssh_port, kept.endpoint) == \
        ("a" * 64, "fd42::1", 42000, "[fd42::1]:8088")
    # Published on the host's loopback (the default): in through the host's p2prc port.
    assert json.loads(json.dumps(kept.as_dict()))["ssh"]["command"] == "p2prc ssh aaaaaaaaaaaa"
    direct = RemoteContainer.from_reply({**good, "direct": True}, endpoint)
    assert json.loads(json.dumps(direct.as_dict()))["ssh"]["command"] == \
        "ssh -p 42000 root@fd42::1"  # OpenSSH takes an IPv6 host without brackets
    for bad in ({"id": "/../../x"}, {"ports": [{"name": "ssh", "internal": 22,
                                               "external": "{{ lookup('pipe', 'id') }}"}]},
                {"ssh": {"port": 42000, "host_key": "ssh-ed25519 AAAA\nevil"}},
                {"expires": "soon"}, {"expires": 1e20}, {"ports": []}, {"gpus": ["0; rm -rf /"]},
                {"gpus": [True]}, {"gpus": [-1]}, {"gpus": 3}, {"gpus": list(range(65))},
                {"direct": "yes"}, {"direct": 1}):
        with pytest.raises(PeerError, match="not a container"):
            RemoteContainer.from_reply({**good, **bad}, endpoint)


PLAIN = "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: echo {word}\n"


def test_a_playbook_runs_by_its_path_without_being_added(node: NodeServices, runner: FakeRunner,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``ansible-playbook deploy.yml``: a file (its folder goes along), or a folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "deploy.yml").write_text(PLAIN.format(word="deployed"))
    monkeypatch.chdir(folder)
    record = node.runs.run("./deploy.yml", ["web"], {}, "fake")
    bundle, played = runner.bundles[-1]
    assert (bundle.name, bundle.playbook, bundle.ports) == ("deploy", "deploy.yml", 0)
    assert "echo deployed" in played and bundle.path != folder  # a copy, as 'add' makes
    assert record["succeeded"] and record["playbook"] == "deploy"
    assert record["source"] == str(folder / "deploy.yml")
    assert [b.name for b in node.playbooks.all()] == ["http"]  # nothing was installed
    # A folder with a p2prc.toml is a bundle: its name, ports and variables count.
    shown = node.runs.run(str(CONTRIB / "http"), [container(1).id], {}, "fake")
    bundle, _ = runner.bundles[-1]
    assert (bundle.name, bundle.ports, bundle.variables["message"]) == \
        ("http", 1, "hello from p2prc")
    assert shown["source"] == str(CONTRIB / "http")
    with pytest.raises(P2PRCError, match="no playbook './nothing.yml'"):
        node.runs.run("./nothing.yml", ["web"], {}, "fake")


def test_a_path_run_is_checked_as_an_added_bundle(node: NodeServices, runner: FakeRunner,
                                                  tmp_path: Path) -> None:
    folder = tmp_path / "sneaky"
    folder.mkdir()
    (folder / "site.yml").write_text("- hosts: localhost\n  tasks: []\n")
    with pytest.raises(P2PRCError, match="would run outside its containers"):
        node.runs.run(str(folder / "site.yml"), ["web"], {}, "fake")
    (folder / "site.yml").write_text(PLAIN.format(word="hi"))
    (folder / "key").symlink_to(node.home / "node.key")
    with pytest.raises(P2PRCError, match="links outside the bundle"):
        node.runs.run(str(folder), ["web"], {}, "fake")
    assert runner.calls == []


def test_an_edited_bundle_runs_as_edited_without_replace(node: NodeServices,
                                                         runner: FakeRunner,
                                                         tmp_path: Path) -> None:
    """A bundle added from a folder follows it: 'run NAME' after an edit there runs the
    edit (and installs it); an edit of the installed copy runs too, and is never lost."""
    import shutil

    source = tmp_path / "src" / "web"
    shutil.copytree(CONTRIB / "twotasks", source)
    (source / "site.yml").write_text(PLAIN.format(word="first"))
    node.playbooks.add(str(source))
    node.runs.run("twotasks", ["web"], {}, "fake")
    assert "echo first" in runner.bundles[-1][1]
    (source / "site.yml").write_text(PLAIN.format(word="edited"))
    record = node.runs.run("twotasks", ["web"], {}, "fake")
    assert "echo edited" in runner.bundles[-1][1]
    assert record["note"] == f"playbook twotasks: ran as edited in {source}"
    installed = node.playbooks.get("twotasks").path / "site.yml"
    assert "echo edited" in installed.read_text()
    assert "note" not in node.runs.run("twotasks", ["web"], {}, "fake")  # nothing new
    # Edited where it is installed: that runs; a later edit of the folder does not undo it.
    installed.write_text(PLAIN.format(word="by hand"))
    node.runs.run("twotasks", ["web"], {}, "fake")
    assert "echo by hand" in runner.bundles[-1][1]
    (source / "site.yml").write_text(PLAIN.format(word="both"))
    record = node.runs.run("twotasks", ["web"], {}, "fake")
    assert "echo by hand" in runner.bundles[-1][1]
    assert "is not followed" in record["note"] and "--replace" in record["note"]
    # 'add --replace' takes the folder again, and follows it from then on.
    node.playbooks.add(str(source), replace=True)
    (source / "site.yml").write_text("- hosts: [\n")
    with pytest.raises(P2PRCError, match="not valid YAML"):  # not the old copy, silently
        node.runs.run("twotasks", ["web"], {}, "fake")


@pytest.mark.parametrize("res, shown, said", [
    # ansible-core 2.19: msg is a summary; the cause is in the line Ansible prints.
    ({"rc": 2, "stderr": "", "msg": "Error executing command.",
      "exception": "(traceback unavailable)"},
     "\x1b[0;31m[ERROR]: Task failed: Module failed: Error executing command: [Errno 2] No "
     "such file or directory: b'pip3'\x1b[0m\r\nOrigin: site.yml:4:7\r\n",
     "Error executing command: [Errno 2] No such file or directory: b'pip3'"),
    # With tracebacks shown (ANSIBLE_DISPLAY_TRACEBACK), the first exception is the cause.
    ({"rc": 2, "msg": "Error executing command.", "exception":
      "Traceback (most recent call last):\n  File \"basic.py\"\nFileNotFoundError: [Errno 2] "
      "No such file or directory: b'pip3'\n\nThe above exception ...\nRuntimeError: x"}, "",
     "Error executing command.: exit 2: FileNotFoundError: [Errno 2] No such file or "
     "directory: b'pip3'"),
    ({"rc": 127, "msg": "non-zero return code", "stderr": "x\n/bin/sh: 1: pip3: not found\n"},
     "[ERROR]: Task failed: Module failed: non-zero return code",
     "non-zero return code: exit 127: /bin/sh: 1: pip3: not found"),
    ({"msg": "MODULE FAILURE\nSee stdout/stderr for the exact error", "rc": 1,
      "module_stderr": "Traceback\n  File x\nImportError: No module named apt\n"}, "",
     "MODULE FAILURE: exit 1: ImportError: No module named apt"),
    ({"msg": "Unable to find any of pip3 to use.  pip needs to be installed."},
     "[ERROR]: Task failed: Module failed: Unable to find any of pip3 to use.  pip needs to "
     "be installed.", "Unable to find any of pip3 to use.  pip needs to be installed."),
    ({"msg": "[Errno 2] No such file or directory: b'pip3'", "rc": 2}, "",  # before 2.19
     "[Errno 2] No such file or directory: b'pip3'"),
])
def test_a_failed_task_says_the_cause_ansible_gave(res: dict[str, Any], shown: str,
                                                   said: str) -> None:
    from p2prc_plugins.ansible import _message

    assert _message(res, shown) == said


def test_a_run_whose_process_is_killed_shows_killed_and_its_ports_come_back(
        node: NodeServices, runner: FakeRunner) -> None:
    """A run's record is written before it runs. What a run killed mid-way (SIGKILL: no
    code of its runs after) leaves is that record, still 'running', naming a process that
    is gone, and the ports it was handed still marked used: 'runs ls' says killed, and the
    next run gives those ports back. (tests/test_faults_client.py kills a real one.)"""
    import subprocess
    import sys

    record = node.runs.run("http", [container(1).id], {}, "fake")
    assert record["state"] == "ok" and record["ports_given"] == {}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    handed, newly = node.tracked.reserve_ports([container(2)], 1, "http")
    run_id, run_dir = node.runs.history.new()
    node.runs.history.save(run_id, {
        "id": run_id, "playbook": "http", "started": 1.0, "finished": None,
        "succeeded": False, "state": "running", "pid": gone.pid, "variables": {},
        "artifacts": str(run_dir), "hosts": {}, "ports_given": newly})
    assert node.tracked.containers()[container(2).id].used_ports == [42021]
    states = {r["id"]: r["state"] for r in node.runs.history.all()}
    assert states == {record["id"]: "ok", run_id: "killed"}
    node.runs.run("http", [container(1).id], {}, "fake")
    assert node.tracked.containers()[container(2).id].used_ports == []  # given back
    assert node.runs.history.get(run_id)["ports_given"] == {}  # once
    # A record of a live process stays running.
    node.runs.history.save(run_id, {**node.runs.history.get(run_id), "state": "running",
                                    "pid": os.getpid()})
    assert node.runs.history.get(run_id)["state"] == "running"
