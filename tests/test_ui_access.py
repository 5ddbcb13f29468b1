"""Who may use the dashboard, and what it does with what peers sent: the real app, driven
through falcon's test client (the browser tests are in test_ui.py)."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import pytest
from falcon import testing

from conftest import BUILTINS
from p2prc_core.config import Settings
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.records import sign_record
from p2prc_core.services import NodeServices
from p2prc_ui import Dashboard, create_app

HOST = "127.0.0.1:8555"


@pytest.fixture
def board(tmp_path: Path) -> Dashboard:
    hooks = make_plugin_manager(load_entrypoints=False, plugins=list(BUILTINS))
    services = NodeServices(Settings(allow_loopback=True), tmp_path / "me", hooks)
    return Dashboard(services, hosts=(HOST,))


def client(board: Dashboard) -> testing.TestClient:
    return testing.TestClient(create_app(board), headers={"Host": HOST})


def signed_in(board: Dashboard) -> testing.TestClient:
    found = client(board)
    found.simulate_get("/peers", params={"token": board.token})
    return found


def cookie(board: Dashboard) -> dict[str, str]:
    return {"Cookie": f"{board.cookie}={board.token}"}


def test_nothing_without_the_token_and_the_token_leaves_the_url(board: Dashboard) -> None:
    web = client(board)
    assert web.simulate_get("/peers").status_code == 403
    guessed = {"Cookie": f"{board.cookie}=guess"}
    assert web.simulate_get("/peers", headers=guessed).status_code == 403
    assert web.simulate_get("/peers", params={"token": "guess"}).status_code == 403
    entered = web.simulate_get("/peers", params={"token": board.token, "sort": "latency"})
    assert entered.status_code == 200  # a page that moves on by itself, without the token
    assert '<meta http-equiv="refresh" content="0;url=/peers?sort=latency">' in entered.text
    assert board.token not in entered.text
    assert "HttpOnly" in entered.headers["Set-Cookie"]
    assert "SameSite=Strict" in entered.headers["Set-Cookie"]
    page = web.simulate_get("/peers", headers=cookie(board))
    assert page.status_code == 200 and "The table is empty" in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "same-origin"


def test_another_host_name_is_refused(board: Dashboard) -> None:
    # DNS rebinding: a page on evil.example whose name now points at 127.0.0.1.
    rebound = client(board).simulate_get("/peers", headers={**cookie(board),
                                                            "Host": "evil.example:8555"})
    assert rebound.status_code == 403 and "Wrong host" in rebound.text


def test_a_form_needs_its_csrf_token_and_this_origin(board: Dashboard) -> None:
    web = client(board)
    form = {**cookie(board), "Content-Type": "application/x-www-form-urlencoded"}
    body = "address=127.0.0.1:1"
    assert web.simulate_post("/peers/add", body=body, headers=form).status_code == 403
    assert web.simulate_post("/peers/add", body=f"{body}&csrf=x", headers=form).status_code \
        == 403
    cross = web.simulate_post("/peers/add", body=f"{body}&csrf={board.csrf}",
                              headers={**form, "Origin": "http://evil.example"})
    assert cross.status_code == 403 and "Cross-site" in cross.text
    big = web.simulate_post("/peers/add", body="x=" + "a" * (20 << 10) + f"&csrf={board.csrf}",
                            headers=form)
    assert big.status_code == 413
    # A good form that fails says why on the page it goes back to, and changes nothing.
    done = web.simulate_post("/peers/add", body=f"{body}&csrf={board.csrf}",
                             headers={**form, "Origin": f"http://{HOST}"})
    assert done.status_code == 303
    said = web.simulate_get(done.headers["Location"], headers=cookie(board))
    assert "Could not add 127.0.0.1:1" in said.text
    assert board.services.table.load() == {}


def test_what_peers_send_is_shown_as_text(board: Dashboard) -> None:
    hostile = sign_record(NodeIdentity.generate(), {
        "name": "<script>alert(1)</script>", "addresses": ["127.0.0.1"], "port": 1, "seq": 1,
        "time": int(time.time()), "metadata": {}, "version": "x",
        "specs": {"gpus": ["<img src=x onerror=alert(2)>"], "gpus_free": 1}})
    PeerTable(board.services.home, board.services.identity.node_id,
              allow_loopback=True).merge([hostile])
    page = client(board).simulate_get("/peers", headers=cookie(board)).text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    # The only scripts are the dashboard's own file.
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/p2prc.js" defer>']
    specs = client(board).simulate_get("/specs", headers=cookie(board)).text
    assert '<option value="&lt;script&gt;alert(1)&lt;/script&gt;">' in specs
    squeezed = client(board).simulate_get("/peers", headers={**cookie(board),
                                                             "Accept-Encoding": "gzip"})
    assert squeezed.headers["Content-Encoding"] == "gzip"
    assert "&lt;script&gt;" in gzip.decompress(squeezed.content).decode()


def test_unknown_things_are_clear_and_files_stay_in_their_run(board: Dashboard,
                                                               tmp_path: Path) -> None:
    web = client(board)
    form = {**cookie(board), "Content-Type": "application/x-www-form-urlencoded"}
    removed = web.simulate_post("/containers/remove",
                                body=f"id=abcdef123456&confirmed=1&csrf={board.csrf}",
                                headers=form)
    said = web.simulate_get(removed.headers["Location"], headers=cookie(board))
    assert "Could not remove abcdef123456" in said.text
    assert web.simulate_get("/runs/nope", headers=cookie(board)).status_code == 404
    runs = board.services.runs.history
    run_id, run_dir = runs.new()
    (run_dir / "stdout").write_text("<b>ansible said</b>")
    runs.save(run_id, {"id": run_id, "playbook": "p", "started": time.time(),
                       "finished": time.time(), "succeeded": True, "variables": {},
                       "artifacts": str(run_dir), "hosts": {}})
    (tmp_path / "secret").write_text("not yours")
    shown = web.simulate_get(f"/runs/{run_id}/files/stdout", headers=cookie(board))
    assert shown.status_code == 200 and shown.headers["Content-Type"].startswith("text/plain")
    for escape in ("../../../secret", "..%2F..%2F..%2Fsecret", "/etc/passwd"):
        assert web.simulate_get(f"/runs/{run_id}/files/{escape}",
                                headers=cookie(board)).status_code == 404


def test_requests_another_origin_made_the_browser_send_are_refused(board: Dashboard) -> None:
    web = client(board)
    for where, status in (("same-site", 403), ("cross-site", 403), ("same-origin", 200),
                          ("none", 200)):
        got = web.simulate_get("/specs", headers={**cookie(board), "Sec-Fetch-Site": where})
        assert got.status_code == status, where  # 127.0.0.1:OTHER_PORT is "same-site"


def test_odd_secrets_and_paths_are_refused_not_crashed_on(board: Dashboard) -> None:
    web = client(board)
    assert web.simulate_get("/peers", params={"token": "é"}).status_code == 403
    assert web.simulate_get("/peers", headers={"Cookie": f"{board.cookie}=é"}).status_code == 403
    form = {**cookie(board), "Content-Type": "application/x-www-form-urlencoded"}
    assert web.simulate_post("/peers/update", body="csrf=%C3%A9",
                             headers=form).status_code == 403
    away = web.simulate_get("/\\evil.example/", params={"token": board.token})
    assert 'content="0;url=/evil.example/"' in away.text  # a path here, not another host
    # A valid token opened from elsewhere (a file, another site) still lets the user in.
    opened = web.simulate_get("/", params={"token": board.token},
                              headers={"Sec-Fetch-Site": "cross-site"})
    assert opened.status_code == 200 and "Set-Cookie" in opened.headers


def test_a_run_whose_artifacts_are_elsewhere_shows_none(board: Dashboard,
                                                        tmp_path: Path) -> None:
    runs = board.services.runs.history
    web = client(board)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "key").write_text("not the run's")
    for artifacts in (None, "", str(tmp_path / "elsewhere"), 7):
        run_id, _ = runs.new()
        runs.save(run_id, {"id": run_id, "playbook": "p", "artifacts": artifacts})
        page = web.simulate_get(f"/runs/{run_id}", headers=cookie(board))
        assert page.status_code == 200 and "None kept." in page.text
        assert web.simulate_get(f"/runs/{run_id}/files/key",
                                headers=cookie(board)).status_code == 404


def test_specs_past_any_float_show_as_unknown(board: Dashboard,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    huge = 10 ** 400
    monkeypatch.setattr(board.services, "specs_now", lambda: {
        "memory": {"total": huge, "available": huge}, "load": {"1m": huge, "5m": [1]},
        "disk": {"free": 1e308 * 10}, "cpu": ["x"],
        "gpus": [{"index": 0, "memory_total": huge, "free": "yes"}, [0]]})
    page = client(board).simulate_get("/specs", headers=cookie(board))
    assert page.status_code == 200 and "? free of ?" in page.text


def test_too_many_connections_at_once_are_closed_and_it_keeps_answering(
        tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import urllib.request

    from conftest import P2PRC
    from p2prc_ui.app import MAX_CONNECTIONS

    ui = subprocess.Popen([P2PRC, "ui", "--no-browser"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    held: list[socket.socket] = []
    try:
        assert ui.stdout is not None
        url = ui.stdout.readline().strip()
        port = int(url.split(":")[2].split("/")[0])
        for _ in range(MAX_CONNECTIONS):  # silent: each holds a thread until it times out
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(extra)
        extra.sendall(b"GET /peers HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert extra.recv(100) == b""  # closed at once, not queued behind the others
        for conn in held:
            conn.close()
        held.clear()
        deadline = time.monotonic() + 30
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        while True:  # the held threads end as their sockets close
            try:
                browser.open(url, timeout=10).close()  # the token, for a cookie
                with browser.open(url.split("?")[0] + "peers", timeout=10) as reply:
                    assert reply.status == 200 and b"The table is empty" in reply.read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for conn in held:
            conn.close()
        ui.terminate()
        ui.wait(15)


def test_destructive_forms_ask_first_without_javascript(board: Dashboard) -> None:
    web = client(board)
    form = {**cookie(board), "Content-Type": "application/x-www-form-urlencoded"}
    for action, button in (("/containers/remove", "Remove"), ("/host/kill", "Kill")):
        asked = web.simulate_post(action, body=f"id=abcdef123456&csrf={board.csrf}",
                                  headers=form)
        assert asked.status_code == 200  # a page that asks; nothing was done
        assert f'<form method="post" action="{action}"' in asked.text
        assert '<input type="hidden" name="confirmed" value="1">' in asked.text
        assert f">{button}</button>" in asked.text


def test_columns_sort_by_what_they_show_and_links_keep_the_filter(
        board: Dashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    def row(name: str, latency: float | None, bandwidth: float | None) -> dict[str, object]:
        return {"name": name, "node_id": name * 13, "own_name": name, "address": "fd42::1",
                "path": "direct", "relays": [], "latency_ms": latency,
                "bandwidth_mbps": bandwidth, "last_seen": time.time(), "failures": 0,
                "gpus": ["A100"], "gpus_free": 1, "memory": None, "cpus": None,
                "trusted": None, "score": 0.0}

    rows = [row("aa", 9.0, 10.0), row("bb", 1.0, None), row("cc", 5.0, 900.0)]
    monkeypatch.setattr(board.services, "peer_rows", lambda with_gpu=False: list(rows))
    web = client(board)

    def order(query: str) -> list[str]:
        page = web.simulate_get("/peers", query_string=query, headers=cookie(board)).text
        return re.findall(r'<tr>\s*<td>(\w\w)</td>', page)

    assert order("sort=latency&order=asc") == ["bb", "cc", "aa"]
    assert order("sort=latency&order=desc") == ["aa", "cc", "bb"]
    assert order("sort=bandwidth&order=desc") == ["cc", "aa", "bb"]  # none last
    page = web.simulate_get("/peers", query_string="gpu=1&sort=latency&order=desc",
                            headers=cookie(board)).text
    assert "&amp;amp;" not in page
    assert 'href="/peers?sort=bandwidth&amp;order=desc&amp;gpu=1"' in page
    assert 'href="/peers?sort=latency&amp;order=desc">All peers</a>' in page
