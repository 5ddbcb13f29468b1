"""Who may use the dashboard, and what it does with what peers sent: the real app, driven
through falcon's test client (the browser tests are in test_ui.py)."""

from __future__ import annotations

import gzip
import http.cookiejar
import ipaddress
import os
import re
import select
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from falcon import testing

from conftest import BUILTINS, P2PRC, LiveServer
from p2prc_core.config import Settings
from p2prc_core.directory import PeerRow
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import parse_endpoint
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
    assert board.services.peers.entries() == {}


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
    monkeypatch.setattr(board.services.own, "specs_now", lambda: {
        "memory": {"total": huge, "available": huge}, "load": {"1m": huge, "5m": [1]},
        "disk": {"free": 1e308 * 10}, "cpu": ["x"],
        "gpus": [{"index": 0, "memory_total": huge, "free": "yes"}, [0]]})
    page = client(board).simulate_get("/specs", headers=cookie(board))
    assert page.status_code == 200 and "? free of ?" in page.text


def test_the_token_is_taken_only_from_the_users_own_navigation(board: Dashboard) -> None:
    """The token becomes a cookie only where the user opened its address (typed, pasted, the
    browser started on it: Sec-Fetch-Site "none") or a tool that is no browser did (no
    Sec-Fetch-* at all): a page that learned the token can neither sign the browser in nor
    send it on to a page of its choice."""
    web = client(board)
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-User": "?1",
             "Sec-Fetch-Dest": "document"}  # what Chromium sends then (see test_ui.py)
    for headers in (typed, {}):
        entered = web.simulate_get("/peers", params={"token": board.token}, headers=headers)
        assert entered.status_code == 200 and board.cookie in entered.headers["Set-Cookie"]
    linked = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
              "Sec-Fetch-Dest": "document"}  # a page of another origin sent the browser here
    for headers in (linked, {**linked, "Sec-Fetch-Site": "same-site"},
                    {**linked, "Sec-Fetch-Site": "same-origin"},
                    {**typed, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
                    {**typed, "Sec-Fetch-Dest": "iframe"}):
        refused = web.simulate_get("/specs", params={"token": board.token,
                                                     "peer": "127.0.0.1:1"}, headers=headers)
        assert refused.status_code == 403, headers
        assert "Set-Cookie" not in refused.headers and "/specs" not in refused.text
        assert "paste the address" in refused.text
    # The page 'p2prc ui' opens through a private file arrives from file:// (cross-site,
    # without the user's activation): it carries a code that works once, not the token.
    code = board.open_once()
    first = web.simulate_get("/peers", params={"open": code, "sort": "name"}, headers=linked)
    assert first.status_code == 200 and board.cookie in first.headers["Set-Cookie"]
    assert code not in first.text and 'content="0;url=/peers?sort=name"' in first.text
    again = web.simulate_get("/peers", params={"open": code}, headers=linked)
    assert again.status_code == 403 and "Set-Cookie" not in again.headers


def test_no_page_changes_the_table_or_pins(board: Dashboard, live_server: LiveServer) -> None:
    """Pages are reads (a link, a prefetch or a page's own refresh may load them): showing a
    peer's specs dials it, but pins it nowhere, and no page writes a file of the node's."""
    home = board.services.home
    web = client(board)

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
                if p.is_file()}

    assert board.services.identity.node_id  # the node's key, made as the node first starts
    before = files()
    first_contact, named = live_server.peer(), f"{live_server.node_id}@{live_server.peer()}"
    for path, query in (("/peers", ""), ("/peers", "gpu=1&sort=latency"), ("/containers", ""),
                        ("/host", ""), ("/runs", ""), ("/jobs", ""), ("/specs", ""),
                        ("/specs", f"peer={first_contact}"), ("/specs", f"peer={named}")):
        page = web.simulate_get(path, query_string=query, headers=cookie(board))
        assert page.status_code == 200, (path, query)
    assert f"Specs of {named} (" in page.text and "cores" in page.text  # it answered
    assert files() == before
    assert board.services.peers.pinned(parse_endpoint(first_contact)) is None


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``p2prc ui`` for a fresh home, as a user starts it; the address it printed."""
    ui = subprocess.Popen([P2PRC, "ui", "--no-browser"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
    try:
        assert ui.stdout is not None
        url = ui.stdout.readline().strip()
        assert url.startswith("http://"), f"p2prc ui printed no address (exit {ui.poll()})"
        yield url
    finally:
        ui.terminate()
        ui.wait(15)


def test_the_dashboard_has_an_address_and_a_cookie_of_its_own(served: str) -> None:
    """A browser sends a host's cookies to each of its ports: on 127.0.0.1 the dashboard's
    would go to every local service (a port 'p2prc forward' serves from a stranger's
    container included). The dashboard takes an address of its own in 127.0.0.0/8."""
    where = urlsplit(served)
    assert where.hostname is not None and where.port is not None
    own = ipaddress.ip_address(where.hostname)
    assert own in ipaddress.ip_network("127.0.0.0/8") and str(own) != "127.0.0.1", served
    try:  # nothing of the dashboard's answers at 127.0.0.1
        with urllib.request.urlopen(served.replace(where.hostname, "127.0.0.1"),
                                    timeout=10) as reply:
            cookies = reply.headers.get_all("Set-Cookie") or []
    except urllib.error.HTTPError as err:
        cookies = err.headers.get_all("Set-Cookie") or []
    except OSError:
        cookies = []
    assert not any(c.startswith("p2prc_ui_") for c in cookies)
    jar = http.cookiejar.CookieJar()
    urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)).open(
        served, timeout=10).close()
    assert [c.domain for c in jar] == [where.hostname]
    for elsewhere in (f"http://127.0.0.1:{where.port + 1}/", "http://localhost:8080/",
                      f"http://{where.hostname}:{where.port}/peers"):
        asked = urllib.request.Request(elsewhere)
        jar.add_cookie_header(asked)
        sent = asked.get_header("Cookie") or ""
        assert ("p2prc_ui_" in sent) == elsewhere.endswith("/peers"), elsewhere


def test_where_no_address_of_its_own_can_be_had_it_says_so(
        board: Dashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback on macOS is 127.0.0.1 alone: the dashboard serves there, and warns."""
    from p2prc_ui import serving

    monkeypatch.setattr(serving, "own_address", lambda: "192.0.2.1")  # no interface has it
    server, warning = serving.bind(None, 0, create_app(board))
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert warning is not None and "192.0.2.1" in warning and "--host" in warning
    finally:
        server.server_close()


class Drips:
    """``count`` connections that send a request head a byte a second and never finish it,
    each opened again when the dashboard closes it (an attacker holds them open), until
    stopped; how long each lasted."""

    HEAD = b"GET /peers HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4096

    def __init__(self, where: tuple[str, int], count: int):
        self.where = where
        self.opened = {self._open(): time.monotonic() for _ in range(count)}
        self.first = set(self.opened)
        self.lasted: dict[socket.socket, float] = {}
        self.lock = threading.Lock()
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> socket.socket:
        return socket.create_connection(self.where, timeout=10)

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            for conn, since in list(self.opened.items()):
                try:
                    conn.sendall(self.HEAD[self.rounds % len(self.HEAD):][:1])
                    if select.select([conn], [], [], 0)[0] and not conn.recv(4096):
                        raise ConnectionResetError
                except OSError:  # closed by the dashboard: how long it held, and again
                    with self.lock:
                        self.lasted[conn] = time.monotonic() - since
                    conn.close()
                    del self.opened[conn]
                    self.opened[self._open()] = time.monotonic()
            self.rounds += 1
            self.stop.wait(1)

    def first_cut(self) -> list[float]:
        """How long each of the first connections lasted, of those cut off so far."""
        with self.lock:
            return [self.lasted[conn] for conn in self.first if conn in self.lasted]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        for conn in self.opened:
            conn.close()


def test_a_request_head_must_come_within_a_few_seconds(served: str) -> None:
    """A client that sends its request a byte a second (never silent for 15 s) is cut off
    once HEAD_SECONDS have passed, though nothing else crowds it."""
    from p2prc_ui.serving import HEAD_SECONDS

    where = urlsplit(served)
    assert where.hostname is not None and where.port is not None
    drip = Drips((where.hostname, where.port), 1)
    try:
        deadline = time.monotonic() + HEAD_SECONDS + 15
        while not drip.first_cut():
            assert time.monotonic() < deadline, "a dripping request was never cut off"
            time.sleep(0.2)
        assert HEAD_SECONDS - 1 < drip.first_cut()[0] < HEAD_SECONDS + 3
    finally:
        drip.close()


def test_slow_clients_do_not_lock_the_user_out(served: str) -> None:
    """Seventy connections dripping their request a byte a second, more than the dashboard
    serves at once: the user's own requests are still answered at once, and each dripping
    connection is cut off after a few seconds (not held while it keeps sending)."""
    from p2prc_ui.serving import MAX_CONNECTIONS

    where = urlsplit(served)
    assert where.hostname is not None and where.port is not None
    drips = Drips((where.hostname, where.port), MAX_CONNECTIONS + 6)
    try:
        for _ in range(3):
            seen = drips.rounds
            deadline = time.monotonic() + 30
            while drips.rounds < seen + 2:  # the drips go on while the user asks
                assert time.monotonic() < deadline, "the dripping stopped"
                time.sleep(0.1)
            started = time.monotonic()
            browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
            browser.open(served, timeout=10).close()  # the token, for a cookie
            with browser.open(f"http://{where.netloc}/peers", timeout=10) as reply:
                assert reply.status == 200 and b"The table is empty" in reply.read()
            assert time.monotonic() - started < 3, "the dashboard answered slowly"
        deadline = time.monotonic() + 30
        while len(drips.first_cut()) < len(drips.first):
            cut = len(drips.first_cut())
            assert time.monotonic() < deadline, f"only {cut} of the first drips were cut off"
            time.sleep(0.2)
        assert max(drips.first_cut()) < 10  # each within a few seconds
    finally:
        drips.close()


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
    def row(name: str, latency: float | None, bandwidth: float | None) -> PeerRow:
        return PeerRow(name=name, node_id=name * 13, own_name=name, address="fd42::1",
                       path="direct", relays=(), latency_ms=latency,
                       bandwidth_mbps=bandwidth, last_seen=time.time(), failures=0,
                       gpus=("A100",), gpus_free=1, memory=None, cpus=None,
                       trusted=None, score=0.0)

    rows = [row("aa", 9.0, 10.0), row("bb", 1.0, None), row("cc", 5.0, 900.0)]
    monkeypatch.setattr(board.services.peers, "rows", lambda with_gpu=False: list(rows))
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
