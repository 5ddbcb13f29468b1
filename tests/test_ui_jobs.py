"""The dashboard's Jobs page (issue 23): the list, a job's page with its log and outputs, its
output files (nothing outside its out_dir), and Kill behind the CSRF token and a question.
Jobs are written into the home's JobStore here: no engine, no peer."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from faultkit import wait_for

from conftest import BUILTINS, P2PRC, LiveServer, friend_with, require
from p2prc_core.config import Settings, load_settings
from p2prc_core.jobs import Job, JobStore
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.services import NodeServices
from p2prc_ui import Dashboard, create_app
from p2prc_ui.jobs_page import save_log

HOST = "127.0.0.1:8555"
MARKUP = "<script>alert(1)</script>"


@pytest.fixture
def board(tmp_path: Path) -> Dashboard:
    hooks = make_plugin_manager(load_entrypoints=False, plugins=list(BUILTINS))
    services = NodeServices(Settings(allow_loopback=True), tmp_path / "me", hooks)
    return Dashboard(services, hosts=(HOST,))


def add_job(board: Dashboard, out_dir: Path, **values: object) -> Job:
    """A job record in the board's home, as 'p2prc exec' keeps one."""
    store = JobStore(board.services.home)
    values = {"command": ["python3", "x.py"], **values}
    job = Job(id=store.new_id(), peer_id="n" * 26, peer_name="alice", container_id="c" * 64,
              out_dir=str(out_dir), **values)  # type: ignore[arg-type]
    store.save(job)
    return job


def get(board: Dashboard, path: str) -> testing.Result:
    return testing.TestClient(create_app(board), headers={"Host": HOST}).simulate_get(
        path, headers={"Cookie": f"{board.cookie}={board.token}"})


def post(board: Dashboard, action: str, body: str, csrf: bool = True) -> testing.Result:
    headers = {"Cookie": f"{board.cookie}={board.token}", "Origin": f"http://{HOST}",
               "Content-Type": "application/x-www-form-urlencoded"}
    return testing.TestClient(create_app(board), headers={"Host": HOST}).simulate_post(
        action, body=body + (f"&csrf={board.csrf}" if csrf else ""), headers=headers)


def test_the_list_shows_jobs_newest_first_with_their_fields(board: Dashboard,
                                                            tmp_path: Path) -> None:
    old = add_job(board, tmp_path / "a", state="done", exit_code=0, started=time.time() - 90,
                  ended=time.time() - 60)
    new = add_job(board, tmp_path / "b", state="failed", exit_code=3)
    page = get(board, "/jobs")
    assert page.status_code == 200
    assert 'href="/jobs"' in page.text and 'aria-current="page"' in page.text
    assert page.text.index(new.id) < page.text.index(old.id)
    assert "python3 x.py" in page.text and "alice" in page.text
    assert ">3<" in page.text and "30.0 s" in page.text
    assert get(board, "/jobs").status_code == 200
    assert testing.TestClient(create_app(board), headers={"Host": HOST}).simulate_get(
        "/jobs").status_code == 403  # no token, no page


def test_a_jobs_page_shows_its_log_and_outputs(board: Dashboard, tmp_path: Path) -> None:
    out = tmp_path / "p2prc-out" / "job"
    (out / "sub").mkdir(parents=True)
    (out / "result.txt").write_text("42\n")
    (out / "sub" / "more.csv").write_text("a,b\n")
    job = add_job(board, out, state="done", exit_code=0, ended=time.time(),
                  outputs=[{"remote": "/job/result.txt", "local": str(out)}])
    save_log(JobStore(board.services.home), job, "hello out\n", "a warning\n")
    page = get(board, f"/jobs/{job.id}")
    assert page.status_code == 200
    assert "hello out" in page.text and "a warning" in page.text
    assert f'href="/jobs/{job.id}/files/result.txt"' in page.text
    assert f'href="/jobs/{job.id}/files/sub/more.csv"' in page.text
    assert "http-equiv" not in page.text  # it ended: no reloading
    assert f'action="/jobs/{job.id}/kill"' not in page.text  # nothing to kill
    served = get(board, f"/jobs/{job.id}/files/result.txt")
    assert served.status_code == 200 and served.text == "42\n"
    assert served.headers["Content-Type"].startswith("text/plain")
    assert get(board, f"/jobs/{job.id}/files/sub/more.csv").text == "a,b\n"
    for wrong in ("/jobs/0000000g", f"/jobs/{job.id[:4]}", "/jobs/last", "/jobs/12345678"):
        assert get(board, wrong).status_code == 404


def test_nothing_outside_the_jobs_out_dir_is_served(board: Dashboard, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (out / "link").symlink_to(secret)
    (out / "dir").symlink_to(tmp_path)
    job = add_job(board, out, state="done", exit_code=0)
    for name in ("../secret.txt", "%2E%2E/secret.txt", "link", "dir/secret.txt",
                 str(secret), "nothere"):
        found = get(board, f"/jobs/{job.id}/files/{name}")
        assert found.status_code == 404, name
        assert "not yours" not in found.text
    page = get(board, f"/jobs/{job.id}")
    assert "files/link" not in page.text and "secret.txt" not in page.text
    gone = add_job(board, tmp_path / "never-made", state="done")
    assert get(board, f"/jobs/{gone.id}/files/x").status_code == 404


def test_kill_needs_the_csrf_token_and_asks_first(board: Dashboard, tmp_path: Path) -> None:
    job = add_job(board, tmp_path / "out", state="running")
    page = get(board, f"/jobs/{job.id}")
    assert f'action="/jobs/{job.id}/kill"' in page.text and board.csrf in page.text
    assert '<meta http-equiv="refresh" content="5">' in page.text  # it runs: reloads
    assert post(board, f"/jobs/{job.id}/kill", "confirmed=1", csrf=False).status_code == 403
    asked = post(board, f"/jobs/{job.id}/kill", "")
    assert asked.status_code == 200 and f"Kill job {job.id}?" in asked.text
    assert f'action="/jobs/{job.id}/kill"' in asked.text and 'name="confirmed"' in asked.text
    assert JobStore(board.services.home).get(job.id).state == "running"


def test_a_finished_job_is_not_killed(board: Dashboard, tmp_path: Path) -> None:
    job = add_job(board, tmp_path / "out", state="done", exit_code=0)
    done = post(board, f"/jobs/{job.id}/kill", "confirmed=1")
    assert done.status_code == 303
    assert "not running" in get(board, done.headers["Location"]).text


def test_a_detached_job_whose_container_is_gone_says_so(board: Dashboard,
                                                        tmp_path: Path) -> None:
    job = add_job(board, tmp_path / "out", state="detached")
    save_log(JobStore(board.services.home), job, "read before\n", "")
    home = board.services.home
    assert board.services.identity.node_id  # the node's key, made as the node first starts
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    page = get(board, f"/jobs/{job.id}")
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before  # a GET
    assert page.status_code == 200
    assert "container is gone" in page.text and "read before" in page.text
    killed = post(board, f"/jobs/{job.id}/kill", "confirmed=1")
    assert "Could not kill" in get(board, killed.headers["Location"]).text


def test_markup_in_a_job_is_shown_escaped(board: Dashboard, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "<b>x.txt").write_text("x")
    job = add_job(board, out, state="failed", exit_code=1, message=MARKUP,
                  command=["sh", "-c", MARKUP])
    job.peer_name = MARKUP
    JobStore(board.services.home).save(job)
    save_log(JobStore(board.services.home), job, MARKUP, MARKUP)
    for page in (get(board, "/jobs").text, get(board, f"/jobs/{job.id}").text):
        assert "<script>alert" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>x" not in get(board, f"/jobs/{job.id}").text


# -- on the real engine: a detached job's live log, and Kill -----------------------------------

@pytest.fixture
def host(tmp_path: Path, engine: Any) -> Iterator[LiveServer]:
    require(subprocess.run(["which", "ssh"], capture_output=True).returncode == 0,
            "the ssh client is missing")
    with friend_with(tmp_path, engine) as server:
        yield server


@pytest.mark.docker
def test_a_detached_jobs_live_log_then_kill_removes_its_container(
        tmp_path: Path, host: LiveServer, engine: Any) -> None:
    home = tmp_path / "me"
    script = "mkdir out; echo made > out/f; echo started; echo '<i>warn</i>' >&2; sleep 300"
    started = subprocess.run([P2PRC, "exec", "--detach", "--on", host.peer(), "-o", "out",
                              "--", "sh", "-c", script], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL,
                             env={**os.environ, "P2PRC_HOME": str(home)})
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    hooks = make_plugin_manager(load_entrypoints=False, plugins=list(BUILTINS))
    board = Dashboard(NodeServices(load_settings(home).settings, home, hooks), hosts=(HOST,))
    deadline = time.monotonic() + 60
    while "started" not in (page := get(board, f"/jobs/{job_id}")).text:
        assert time.monotonic() < deadline, page.text
    assert "Read from its container just now" in page.text
    assert "&lt;i&gt;warn&lt;/i&gt;" in page.text and "<i>warn" not in page.text
    assert '<meta http-equiv="refresh" content="5">' in page.text
    assert f'action="/jobs/{job_id}/kill"' in page.text
    killed = post(board, f"/jobs/{job_id}/kill", "confirmed=1")
    assert killed.status_code == 303
    assert "container is removed" in get(board, killed.headers["Location"]).text
    job = JobStore(home).get(job_id)
    assert job.state == "interrupted" and job.ended is not None
    # The last output's stream had the host remove it: gone a moment later, unwaited for.
    wait_for(lambda: engine.api.containers(all=True, filters={
        "label": f"org.p2prc.node={host.node_id}"}) == [], 30, "the container removed")
    after = get(board, f"/jobs/{job_id}")
    assert "started" in after.text and "http-equiv" not in after.text  # the log it kept
    assert get(board, f"/jobs/{job_id}/files/out/f").text == "made\n"
