"""p2prc's own ansible-playbook process (``p2prc_plugins.ansible_process``): real
ansible-playbook on this machine (the local connection: no container needed), its results
read live from p2prc's callback, the gate that holds it before any play, and what a hostile
or broken event stream does (nothing but drop its bad lines)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from faultkit import wait_for

from conftest import require
from p2prc_plugins import ansible_process
from p2prc_plugins.ansible_process import Playbook, PlaybookEnd, _Events, play

LOCAL = {"all": {"hosts": {"here": {"ansible_connection": "local",
                                    "ansible_python_interpreter": sys.executable}}}}


def needs_ansible() -> None:
    require(Path(sys.executable).with_name("ansible-playbook").exists()
            or shutil.which("ansible-playbook") is not None, "ansible-playbook is missing")


def project(tmp_path: Path, site: str) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir(exist_ok=True)
    (folder / "site.yml").write_text(site)
    return folder


def gated(tmp_path: Path, marker: Path, run_dir: Path,
          on_event: Any = lambda event: None) -> Playbook:
    """A play that touches ``marker``, started and held at its gate."""
    return Playbook(project(tmp_path, touching(marker)), "site.yml", LOCAL, {}, run_dir,
                    on_event, gated=True)


def at_the_gate(pid: int) -> bool:
    """The process is blocked reading the gate's pipe (the descriptor in its P2PRC_GATE_FD)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    gate = next((int(v.split(b"=", 1)[1]) for v in environ
                 if v.startswith(b"P2PRC_GATE_FD=")), None)  # (None: not yet started)
    call = Path(f"/proc/{pid}/syscall").read_text().split()
    return gate is not None and call[:2] == ["0", hex(gate)]  # read(gate, ...)


def touching(marker: Path, then: str = "") -> str:
    return ("- hosts: all\n  gather_facts: false\n  tasks:\n"
            f"    - name: mark\n      ansible.builtin.file: path={marker} state=touch\n" + then)


@pytest.mark.ansible
def test_a_play_hands_on_each_result_as_it_comes_and_keeps_its_artifacts(tmp_path: Path) -> None:
    needs_ansible()
    marker = tmp_path / "ran"
    site = touching(marker, "    - name: says no\n      ansible.builtin.command: /no/such/tool\n"
                            "      ignore_errors: true\n"
                            "    - name: skipped\n      ansible.builtin.debug: msg=x\n"
                            "      when: false\n")
    events: list[dict[str, Any]] = []
    end = play(project(tmp_path, site), "site.yml", LOCAL, {"secret": "s3"}, tmp_path / "run",
               events.append)
    assert end.rc == 0 and marker.exists()
    assert [(e["event"], e["event_data"]["task"]) for e in events] == [
        ("runner_on_ok", "mark"), ("runner_on_failed", "says no"),
        ("runner_on_skipped", "skipped")]
    failed = events[1]["event_data"]
    assert failed["host"] == "here" and failed["ignore_errors"] is True
    assert failed["res"]["rc"] == 2  # and the cause, as Ansible's own output gives it:
    assert "No such file or directory" in events[1]["stdout"]
    assert "/no/such/tool" in events[1]["stdout"]
    assert end.stats["ok"] == {"here": 2} and end.stats["skipped"] == {"here": 1}
    assert end.stats["ignored"] == {"here": 1}
    artifacts = tmp_path / "run" / "artifacts"
    assert "PLAY RECAP" in (artifacts / "stdout").read_text()  # Ansible's own output
    assert sorted(p.name for p in (artifacts / "job_events").iterdir()) == [
        "1-runner_on_ok.json", "2-runner_on_failed.json", "3-runner_on_skipped.json",
        "4-playbook_on_stats.json"]
    assert (artifacts / "rc").read_text() == "0"
    variables = tmp_path / "run" / "env" / "extravars"
    assert json.loads(variables.read_text()) == {"secret": "s3"}
    assert variables.stat().st_mode & 0o077 == 0  # the run's variables are private


@pytest.mark.ansible
def test_a_gated_play_logs_in_nowhere_until_it_is_let_go(tmp_path: Path) -> None:
    needs_ansible()
    marker = tmp_path / "ran"
    held = gated(tmp_path, marker, tmp_path / "a")
    try:  # it read the playbook and the inventory, and waits at the gate:
        wait_for(lambda: at_the_gate(held.proc.pid), 120, "ansible-playbook at its gate")
        assert not marker.exists()
    finally:
        held.cancel()  # as p2prc does when a target turned out to be gone
    assert held.proc.returncode is not None and not marker.exists()

    events: list[dict[str, Any]] = []
    end = gated(tmp_path, marker, tmp_path / "b", events.append).wait()  # lets it go
    assert end.rc == 0 and marker.exists() and events[0]["event"] == "runner_on_ok"


@pytest.mark.ansible
def test_a_play_whose_gate_closes_without_a_word_ends_before_any_task(tmp_path: Path) -> None:
    """p2prc killed while Ansible waits at the gate: Ansible ends there, having run nothing."""
    needs_ansible()
    marker = tmp_path / "ran"
    held = gated(tmp_path, marker, tmp_path / "run")
    os.close(held.gate)  # the write end gone, as when p2prc dies
    held.gate = -1
    end = held.wait()
    assert end.rc == 75 and not marker.exists()


@pytest.mark.ansible
def test_a_playbook_ansible_cannot_read_says_why(tmp_path: Path) -> None:
    needs_ansible()
    end = play(project(tmp_path, "- hosts: all\n  tasks:\n    - bogus_module_name: {}\n"),
               "site.yml", LOCAL, {}, tmp_path / "run", lambda event: None)
    assert end.rc != 0 and end.stats == {}
    assert "ERROR" in end.last_line and "bogus_module_name" in end.last_line


@pytest.mark.ansible
def test_an_error_in_the_handler_stops_ansible_and_goes_on(tmp_path: Path) -> None:
    """A Ctrl-C (here raised by the handler) ends Ansible: nothing of the play is left
    running, and the caller gets the interrupt."""
    needs_ansible()
    marker = tmp_path / "second"
    site = touching(tmp_path / "first", "    - name: wait\n      ansible.builtin.pause:"
                                        " seconds=30\n"
                                        f"    - ansible.builtin.file: path={marker} "
                                        "state=touch\n")
    started: list[Playbook] = []

    def interrupt(event: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    original = ansible_process.Playbook.__init__

    def keep(self: Playbook, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        started.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ansible_process.Playbook, "__init__", keep)
        with pytest.raises(KeyboardInterrupt):
            play(project(tmp_path, site), "site.yml", LOCAL, {}, tmp_path / "run", interrupt)
    assert started[0].proc.returncode is not None and not marker.exists()


@pytest.mark.ansible
def test_the_callbacks_a_user_enabled_still_run(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    needs_ansible()
    monkeypatch.setenv("ANSIBLE_CALLBACKS_ENABLED", "junit")  # ansible-core's own
    monkeypatch.setenv("JUNIT_OUTPUT_DIR", str(tmp_path / "junit"))
    events: list[dict[str, Any]] = []
    play(project(tmp_path, touching(tmp_path / "ran")), "site.yml", LOCAL, {}, tmp_path / "run",
         events.append)
    assert [e["event"] for e in events] == ["runner_on_ok"]
    [report] = (tmp_path / "junit").iterdir()
    assert "mark" in report.read_text()


def test_ansible_playbook_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from p2prc_core.errors import P2PRCError

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(P2PRCError, match="ansible-playbook is not installed: pip install"):
        play(tmp_path, "site.yml", LOCAL, {}, tmp_path / "run", lambda event: None)


# -- what the event stream may hold -------------------------------------------------------------

def read_lines(tmp_path: Path, payload: bytes) -> tuple[list[dict[str, Any]], Any, list[str]]:
    """``payload`` written to the events pipe by a real process, read as p2prc reads it."""
    read_end, write_end = os.pipe()
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.write(int(sys.argv[1]), "
                               "sys.stdin.buffer.read())", str(write_end)],
        stdin=subprocess.PIPE, pass_fds=(write_end,))
    os.close(write_end)
    assert writer.stdin is not None
    writer.stdin.write(payload)
    writer.stdin.close()
    got: list[dict[str, Any]] = []
    folder = tmp_path / "events"
    folder.mkdir()
    try:
        stats = _Events(folder, got.append).read(read_end, writer)  # type: ignore[arg-type]
    finally:
        os.close(read_end)
    writer.wait()
    return got, stats, sorted(p.name for p in folder.iterdir())


GOOD = {"event": "runner_on_ok", "event_data": {"host": "h", "task": "t", "res": {}}}


def test_bad_lines_on_the_event_stream_are_dropped_and_the_good_ones_kept(tmp_path: Path
                                                                        ) -> None:
    lines = [b"not json", b"[1, 2]", b'{"event": 7}', b'{"event": "../../escape"}',
             b'{"event": "' + b"a" * 41 + b'"}', b'{"event": "runner_on_ok", "event_data": 3}',
             b"\xff\xfe", b"x" * (ansible_process._MAX_LINE + 10) + b'{"event": "lost"}',
             json.dumps(GOOD).encode(),
             json.dumps({"event": "playbook_on_stats", "event_data": {
                 "ok": {"h": 2, "bad": "2", "worse": True}, "dark": [], "failures": {}}}).encode()]
    got, stats, files = read_lines(tmp_path, b"\n".join(lines) + b"\n")
    assert got == [GOOD]
    assert stats == {"ok": {"h": 2}, "failures": {}}
    # Only well-named events are kept as files, inside the folder.
    assert files == ["1-runner_on_ok.json", "2-runner_on_ok.json", "3-playbook_on_stats.json"]
    assert not (tmp_path / "escape.json").exists()


def test_a_stream_cut_mid_line_loses_only_that_line(tmp_path: Path) -> None:
    got, stats, _ = read_lines(tmp_path, json.dumps(GOOD).encode() + b'\n{"event": "runn')
    assert got == [GOOD] and stats == {}


def test_an_end_without_a_recap_is_an_end(tmp_path: Path) -> None:
    end = PlaybookEnd(4)
    assert end.stats == {} and end.last_line == ""


# -- the callback fails closed ------------------------------------------------------------------

def by_hand(tmp_path: Path, site: str, **env: str) -> subprocess.CompletedProcess[str]:
    """ansible-playbook with p2prc's callback, as ``Playbook`` starts it, but with ``env``."""
    folder = project(tmp_path, site)
    (tmp_path / "hosts.json").write_text(json.dumps(LOCAL))
    return subprocess.run(
        [ansible_process.ansible_playbook(), "-i", str(tmp_path / "hosts.json"), "site.yml"],
        cwd=folder, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_STDOUT_CALLBACK": "p2prc_events",
             "ANSIBLE_CALLBACK_PLUGINS": str(ansible_process.CALLBACKS), **env})


@pytest.mark.ansible
@pytest.mark.parametrize("events, gate", [
    ("999", ""),  # no such descriptor: the callback cannot load
    ("1", "999"),  # a gate that is not there
    ("1", "x"),  # a gate that is not a descriptor
])
def test_a_callback_that_cannot_hold_the_play_ends_it_before_any_task(
        tmp_path: Path, events: str, gate: str) -> None:
    needs_ansible()
    marker = tmp_path / "ran"
    done = by_hand(tmp_path, touching(marker), P2PRC_EVENTS_FD=events, P2PRC_GATE_FD=gate)
    assert done.returncode != 0 and not marker.exists(), done.stdout + done.stderr
    if gate:
        assert done.returncode == 75


@pytest.mark.ansible
def test_ansible_ends_when_p2prc_is_gone(tmp_path: Path) -> None:
    """p2prc killed mid-play (its end of the pipe closed): Ansible ends at its next result,
    as it did when its terminal hung up, and runs no further task."""
    needs_ansible()
    first, second = tmp_path / "first", tmp_path / "second"
    site = touching(first, f"    - ansible.builtin.file: path={second} state=touch\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [ansible_process.ansible_playbook(), "-i", "localhost,", "-c", "local", "site.yml"],
            cwd=project(tmp_path, site), capture_output=True, text=True, timeout=300,
            pass_fds=(write_end,),
            env={**os.environ, "ANSIBLE_STDOUT_CALLBACK": "p2prc_events",
                 "ANSIBLE_CALLBACK_PLUGINS": str(ansible_process.CALLBACKS),
                 "P2PRC_EVENTS_FD": str(write_end),
                 "ANSIBLE_PYTHON_INTERPRETER": sys.executable})
    finally:
        os.close(write_end)
    assert done.returncode == 75, done.stdout + done.stderr
    assert first.exists() and not second.exists()
