"""Playbook bundles, and runs of real Ansible against real containers over SSH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import P2PRC, LiveServer, friend_with, require
from p2prc_core.tasks import BundleError, Playbooks, load_bundle, parse_variables

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib" / "playbooks"


def p2prc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "P2PRC_HOME": str(home)})


# -- bundles -------------------------------------------------------------------------------------

def bundle(tmp_path: Path, toml: str, site: str | None = "- hosts: all\n  tasks: []\n") -> Path:
    path = tmp_path / "bundle"
    path.mkdir()
    (path / "p2prc.toml").write_text(toml)
    if site is not None:
        (path / "site.yml").write_text(site)
    return path


def test_the_contrib_bundles_are_valid() -> None:
    names = {load_bundle(path).name for path in CONTRIB.iterdir()}
    assert names == {"http", "vscode", "twotasks"}
    assert load_bundle(CONTRIB / "http").ports == 1


@pytest.mark.parametrize("toml, site, words", [
    ('name = "x"\n', None, "has no site.yml"),
    ('name = "Bad Name"\n', "- hosts: all\n", "name must be"),
    ('name = "x"\nports = -1\n', "- hosts: all\n", "ports must be"),
    ('name = "x"\nports = "2"\n', "- hosts: all\n", "ports must be"),
    ('name = "x"\nextra = 1\n', "- hosts: all\n", "unknown keys"),
    ('name = "x"\n[variables]\n"1a" = 2\n', "- hosts: all\n", "[variables]"),
    ("name = \n", "- hosts: all\n", "not valid TOML"),
    ('name = "x"\n', "hosts: [", "not valid YAML"),
    ('name = "x"\n', "- tasks: []\n", "each with 'hosts'"),
    ('name = "x"\n', "just text\n", "list of plays"),
])
def test_a_bad_bundle_is_refused_with_the_reason(tmp_path: Path, toml: str, site: str | None,
                                                 words: str) -> None:
    path = bundle(tmp_path, toml, site)
    with pytest.raises(BundleError, match=words.replace("[", r"\[")):
        Playbooks(tmp_path / "home").add(str(path))
    assert Playbooks(tmp_path / "home").all() == []


def test_playbooks_add_ls_rm_and_original_flags(tmp_path: Path) -> None:
    home = tmp_path / "home"
    added = p2prc(home, "playbooks", "add", str(CONTRIB / "http"))
    assert added.returncode == 0 and "added http" in added.stdout
    again = p2prc(home, "playbooks", "add", str(CONTRIB / "http"))
    assert again.returncode == 1 and "installed already" in again.stderr
    assert p2prc(home, "--pp", str(CONTRIB / "twotasks")).returncode == 0
    listed = json.loads(p2prc(home, "playbooks", "ls", "--json").stdout)
    assert [b["name"] for b in listed] == ["http", "twotasks"]
    assert listed[0]["variables"] == {"message": "hello from p2prc"}
    assert "twotasks" in p2prc(home, "--vp").stdout
    assert p2prc(home, "--rp", "twotasks").returncode == 0
    assert p2prc(home, "playbooks", "rm", "http").returncode == 0
    assert json.loads(p2prc(home, "playbooks", "ls", "--json").stdout) == []
    missing = p2prc(home, "playbooks", "rm", "http")
    assert missing.returncode == 1 and "no playbook 'http'" in missing.stderr


def test_playbooks_add_from_a_git_url(tmp_path: Path) -> None:
    require(shutil.which("git") is not None, "git is missing")
    repo = tmp_path / "repo"
    shutil.copytree(CONTRIB / "twotasks", repo)
    for args in (["init", "-q"], ["add", "."],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "bundle"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    home = tmp_path / "home"
    added = p2prc(home, "playbooks", "add", f"file://{repo}")
    assert added.returncode == 0, added.stderr
    assert not (home / "playbooks" / "twotasks" / ".git").exists()


def test_variables_from_the_command_line() -> None:
    assert parse_variables(("a=1", "b=text", "c=[1, 2]", "d=")) == \
        {"a": 1, "b": "text", "c": [1, 2], "d": ""}
    with pytest.raises(BundleError, match="KEY=VALUE"):
        parse_variables(("novalue",))


# -- runs against real containers ----------------------------------------------------------------

def on_containers(test: Any) -> Any:
    """Marks a test that runs real Ansible against real containers."""
    for mark in (pytest.mark.docker, pytest.mark.ansible, pytest.mark.integration):
        test = mark(test)
    return test


@pytest.fixture
def host(friend: LiveServer) -> LiveServer:
    """A real server that trusts tmp_path/'me' (conftest's friend), where Ansible runs."""
    require(shutil.which("ansible-playbook") is not None or
            Path(P2PRC).with_name("ansible-playbook").exists(), "ansible-playbook is missing")
    return friend


def touch(tmp_path: Path, host: LiveServer, ports: int) -> dict[str, Any]:
    result = p2prc(tmp_path / "me", "touch", host.peer(), "--ports", str(ports), "--json")
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply




@pytest.fixture
def publishing_host(tmp_path: Path, engine: object) -> Iterator[LiveServer]:
    """``host``, publishing its containers' ports on its addresses (publish_ports = "all")."""
    require(shutil.which("ansible-playbook") is not None or
            Path(P2PRC).with_name("ansible-playbook").exists(), "ansible-playbook is missing")
    with friend_with(tmp_path, engine, P2PRC_PUBLISH_PORTS="all") as server:
        yield server


@on_containers
def test_http_bundle_on_a_group_of_two_is_served_to_another_namespace(
        tmp_path: Path, publishing_host: LiveServer) -> None:
    from netlab import NetLab, available

    reason = available()
    require(reason is None, reason or "")
    host = publishing_host
    me = tmp_path / "me"
    first, second = touch(tmp_path, host, 2), touch(tmp_path, host, 2)
    assert p2prc(me, "group", "create", "web").returncode == 0
    assert p2prc(me, "group", "add", "web", first["id"], second["id"]).returncode == 0
    assert p2prc(me, "playbooks", "add", str(CONTRIB / "http")).returncode == 0
    run = p2prc(me, "run", "http", "--on", "web", "-e", "message=hi", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads(run.stdout)
    assert record["succeeded"] and set(record["hosts"]) == {first["id"][:12], second["id"][:12]}
    assert all(h["status"] == "ok" and h["ok"] >= 4 for h in record["hosts"].values())
    lab = NetLab(tmp_path / "lab")
    try:
        outside = lab.add_host("outside")
        for container in (first, second):
            port = container["ports"][1]["external"]
            fetch = subprocess.run(outside.command(
                "python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                f"'http://[{lab.v6_prefix}1]:{port}/', timeout=10).read().decode())"),
                capture_output=True, text=True, timeout=30)
            assert fetch.stdout.strip() == f"hi from {container['id'][:12]}", fetch.stderr
    finally:
        lab.close()
    # The run is kept: listed, and shown with its artifacts.
    runs = json.loads(p2prc(me, "runs", "ls", "--json").stdout)
    assert [r["id"] for r in runs] == [record["id"]]
    shown = p2prc(me, "runs", "show", record["id"][:15])
    assert "succeeded" in shown.stdout and Path(record["artifacts"]).is_dir()
    # A re-run serves on the same port (the page changes, no second server, no port eaten),
    # and says which port each host used.
    for message in ("again", "and again"):
        rerun = p2prc(me, "run", "http", "--on", first["id"][:12], "-e",
                      f"message={message}", "--json")
        again = json.loads(rerun.stdout)
        assert again["succeeded"], rerun.stderr
        port = first["ports"][1]["external"]
        assert [p["external"] for p in again["hosts"][first["id"][:12]]["ports"]] == [port]
    tracked = json.loads((me / "containers.json").read_text())[first["id"]]
    assert tracked["used_ports"] == [first["ports"][1]["external"]]
    last = p2prc(me, "runs", "show", "last")
    assert again["id"] in last.stdout and f":{port}" in last.stdout


FAILING = """- hosts: all
  gather_facts: false
  tasks:
    - name: fail on the first host only
      ansible.builtin.fail:
        msg: "this host was told to fail"
      when: inventory_hostname == target
    - name: then say hello
      ansible.builtin.command: echo hello
    - name: a command that fails on the second host
      ansible.builtin.shell: echo "disk full on $(hostname)" >&2; exit 3
      when: inventory_hostname != target
"""


@on_containers
def test_failed_hosts_say_which_task_and_why(tmp_path: Path,
                                                              host: LiveServer) -> None:
    me = tmp_path / "me"
    first, second = touch(tmp_path, host, 0), touch(tmp_path, host, 0)
    path = bundle(tmp_path, 'name = "half"\n', FAILING)
    assert p2prc(me, "playbooks", "add", str(path)).returncode == 0
    run = p2prc(me, "run", "half", "--on", first["id"][:12], "--on", second["id"][:12],
                "-e", f"target={first['id'][:12]}", "--json")
    assert run.returncode == 1
    hosts = json.loads(run.stdout)["hosts"]
    assert hosts[first["id"][:12]]["status"] == "failed"
    assert "this host was told to fail" in hosts[first["id"][:12]]["message"]
    assert hosts[first["id"][:12]]["task"] == "fail on the first host only"
    # A failed command says what it wrote to stderr, not only "non-zero return code".
    failed = hosts[second["id"][:12]]
    assert failed["status"] == "failed" and failed["ok"] >= 1
    assert failed["task"] == "a command that fails on the second host"
    assert "exit 3" in failed["message"]
    assert f"disk full on {second['id'][:12]}" in failed["message"]
    table = p2prc(me, "runs", "show", json.loads(run.stdout)["id"])
    assert "FAILED" in table.stdout and "disk full on" in table.stdout


@on_containers
def test_a_container_that_cannot_be_reached_fails_clearly(tmp_path: Path,
                                                          host: LiveServer) -> None:
    me = tmp_path / "me"
    container = touch(tmp_path, host, 0)
    short = container["id"][:12]
    assert p2prc(me, "playbooks", "add", str(CONTRIB / "twotasks")).returncode == 0
    # Its host runs it, but SSH cannot log in there (what answers is not the container
    # whose key is pinned): Ansible reports the host unreachable, and runs nothing.
    tracked_path = me / "containers.json"
    tracked = json.loads(tracked_path.read_text())
    tracked[container["id"]]["host_key"] = \
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHzF2tyCSpt4mWBSQwh5BLLvXXHdsOpbS0wNd/XTvLsx"
    tracked_path.write_text(json.dumps(tracked))
    run = p2prc(me, "run", "twotasks", "--on", short, "--json")
    assert run.returncode == 1
    result = json.loads(run.stdout)["hosts"][short]
    assert result["status"] == "unreachable"
    assert "host key" in result["message"].lower() or "ssh" in result["message"].lower()
    # Once the host killed it, nothing is run there: its port may be another's container.
    kill = subprocess.run([P2PRC, "server", "containers", "kill", short],
                          env={**os.environ, "P2PRC_HOME": str(host.home)},
                          capture_output=True, text=True, timeout=60)
    assert kill.returncode == 0
    gone = p2prc(me, "run", "twotasks", "--on", short)
    assert gone.returncode == 1 and f"{short} is gone from" in gone.stderr
    ssh = p2prc(me, "ssh", short, "true")
    assert ssh.returncode == 1 and f"{short} is gone from" in ssh.stderr


BROKEN = """- hosts: all
  gather_facts: false
  tasks:
    - name: start a program that is not there
      ansible.builtin.command: /no/such/binary --version
"""


@on_containers
def test_a_run_by_path_says_why_and_goes_on_past_a_gone_container(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    """Three items at once, on real containers: a playbook run by its path (no 'playbooks
    add'); the cause Ansible gives for a program that is not there (ansible-core 2.19 says
    only "Error executing command." in msg); a group member removed on its host is reported
    unreachable while the other one runs."""
    me = tmp_path / "me"
    live, gone = touch(tmp_path, host, 0), touch(tmp_path, host, 0)
    assert p2prc(me, "group", "create", "pair").returncode == 0
    assert p2prc(me, "group", "add", "pair", live["id"], gone["id"]).returncode == 0
    engine.containers.get(gone["id"]).remove(force=True)  # gone behind p2prc's back
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "site.yml").write_text(BROKEN)
    run = subprocess.run([P2PRC, "run", "./site.yml", "--on", "pair", "--json"], cwd=folder,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "P2PRC_HOME": str(me)})
    assert run.returncode == 1, run.stdout + run.stderr
    record = json.loads(run.stdout)
    assert record["source"] == str(folder / "site.yml")
    ran = record["hosts"][live["id"][:12]]
    assert (ran["status"], ran["task"]) == ("failed", "start a program that is not there")
    cause = "No such file or directory: b'/no/such/binary'"
    assert cause in ran["message"], ran
    missing = record["hosts"][gone["id"][:12]]
    assert missing["status"] == "unreachable" and "is gone" in missing["message"]
    kept = json.loads(p2prc(me, "runs", "show", record["id"], "--json").stdout)
    assert cause in kept["hosts"][live["id"][:12]]["message"]
    # The dashboard's run page says it too.
    from falcon import testing

    from conftest import BUILTINS
    from p2prc_core.config import Settings
    from p2prc_core.plugins import make_plugin_manager
    from p2prc_core.services import NodeServices
    from p2prc_ui import Dashboard, create_app

    board = Dashboard(NodeServices(Settings(), me, make_plugin_manager(
        load_entrypoints=False, plugins=list(BUILTINS))), hosts=("127.0.0.1:8555",))
    page = testing.TestClient(create_app(board), headers={"Host": "127.0.0.1:8555"}) \
        .simulate_get(f"/runs/{record['id']}",
                      headers={"Cookie": f"{board.cookie}={board.token}"})
    assert page.status_code == 200
    assert "No such file or directory: b&#39;/no/such/binary&#39;" in page.text
    assert "is gone" in page.text


def test_running_on_nothing_known_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    p2prc(home, "playbooks", "add", str(CONTRIB / "twotasks"))
    result = p2prc(home, "run", "twotasks", "--on", "abcdef123456")
    assert result.returncode == 1 and "no tracked container" in result.stderr
    unknown = p2prc(home, "run", "nope", "--on", "abcdef123456")
    assert unknown.returncode == 1 and "no playbook 'nope'" in unknown.stderr


@on_containers
def test_a_confined_run_keeps_every_task_in_its_containers(tmp_path: Path,
                                                          host: LiveServer) -> None:
    """Even a bundle that asks for the local connection every way the scan might miss runs
    its tasks in the container when p2prc confines it (the default)."""
    from p2prc_core.my_containers import Tracked
    from p2prc_core.tasks import RunTarget, load_bundle
    from p2prc_plugins.ansible import AnsibleRunner

    marker = Path(f"/tmp/p2prc-ran-here-{tmp_path.name}-{os.getpid()}")  # exists in both
    bundle = tmp_path / "sneaky"
    bundle.mkdir()
    (bundle / "p2prc.toml").write_text('name = "sneaky"\n')
    (bundle / "site.yml").write_text(
        "- hosts: all\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - set_fact: ansible_connection=local\n"
        f"    - command: touch {marker}\n"
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        f"    - command: touch {marker}.localhost\n")
    container = touch(tmp_path, host, 0)
    kept = Tracked(tmp_path / "me").find(container["id"])
    from p2prc_core.sshkeys import ensure_key

    target = RunTarget(kept.short_id, kept.id, kept.host, kept.ssh_port, "root",
                       ensure_key(tmp_path / "me")[0], kept.host_key, [])
    result = AnsibleRunner().run(load_bundle(bundle), [target], {}, tmp_path / "run",
                                 lambda *event: None, confined=True)
    assert result.hosts[kept.short_id].status == "ok", result.hosts
    try:
        assert not marker.exists() and not Path(f"{marker}.localhost").exists()
    finally:
        marker.unlink(missing_ok=True)
        Path(f"{marker}.localhost").unlink(missing_ok=True)
    inside = p2prc(tmp_path / "me", "ssh", kept.short_id, f"test -e {marker} && echo inside")
    assert inside.stdout.strip() == "inside", inside.stderr
