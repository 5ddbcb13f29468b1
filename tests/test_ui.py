"""The dashboard in a real headless browser (Debian's Chromium, driven by ChromeDriver through
Selenium) against real servers, the real Docker engine and real Ansible: every page loads,
remove and kill reach the engine, an invite made on the page is redeemed from another home,
regions update without a reload, and a phone-wide window does not scroll sideways.

Screenshots of each page go to the test's directory, or to $P2PRC_UI_SCREENSHOTS
(scripts/ui-screenshots makes docs/ui/ from them)."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import P2PRC, LiveServer, require
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.records import sign_record

pytestmark = [pytest.mark.docker, pytest.mark.ansible, pytest.mark.integration]

FAILING = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: say hello
      ansible.builtin.command: echo hello
    - name: a task that fails
      ansible.builtin.shell: echo "disk full on $(hostname)" >&2; exit 3
"""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60,
             browser: Any = None) -> Any:
    """Poll ``check`` until it gives something true; fail naming ``what`` (and saying what
    ``browser`` shows then)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            found = check()
        except Exception:  # noqa: BLE001 - the page is between states
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            shown = ""
            if browser is not None:
                body = browser.find_element("tag name", "body").text
                shown = f" at {browser.current_url}: {body[:2000]}"
            raise AssertionError(f"timed out waiting for {what}{shown}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "P2PRC_HOME": str(home)})


class UI:
    """``p2prc ui`` for a home, on a free port; its printed address carries the token."""

    def __init__(self, home: Path, opens: bool = False):
        # opens: as a user runs it, opening "the browser" (here a program that does
        # nothing: the test's browser opens the file it was handed).
        self.proc = subprocess.Popen([P2PRC, "ui", *([] if opens else ["--no-browser"])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "P2PRC_HOME": str(home),
                                                     "BROWSER": "true"})
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()),  # type: ignore
                         daemon=True).start()
        try:
            self.url = lines.get(timeout=30).strip()
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("p2prc ui printed no address") from None
        # An address of its own in 127.0.0.0/8: its cookie goes to no other local service.
        host = urlsplit(self.url).hostname or ""
        assert host.startswith("127.") and host != "127.0.0.1", self.url
        self.base = self.url.split("/?", 1)[0]
        self.token = self.url.split("token=", 1)[1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    require(shutil.which("chromium") is not None and shutil.which("chromedriver") is not None,
            "Chromium and ChromeDriver are missing: scripts/browser")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require(False, "selenium is not installed: scripts/setup test")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("P2PRC_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def alive(client: Any, container_id: str) -> bool:
    import docker

    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False


def click_and_confirm(browser: Any, form_selector: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"{form_selector} button").click()
    wait_for("the confirmation", lambda: browser.switch_to.alert).accept()


def test_every_page_against_real_servers(tmp_path: Path, friend: LiveServer, browser: Any,
                                         engine: Any, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    import p2prc

    me = tmp_path / "me"
    node = p2prc.Node.open(me)
    alice = node.add_peer(friend.peer(), name="alice")
    first, second = node.touch(alice, ports=1), node.touch(alice)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "p2prc.toml").write_text('name = "half"\n')
    (bundle / "site.yml").write_text(FAILING)
    assert cli(me, "playbooks", "add", str(bundle)).returncode == 0
    run = node.run_playbook("half", [first])
    assert not run.succeeded and run.hosts[first.short_id].status == "failed"
    assert run.hosts[first.short_id].task == "a task that fails"
    mine, hosts = UI(me, opens=True), UI(friend.home)
    try:
        def page(ui: UI, path: str, shot: str | None = None) -> str:
            browser.get(ui.base + path)
            text = wait_for(f"{path} to load", lambda: browser.find_element(By.TAG_NAME,
                                                                               "main").text)
            if shot:
                browser.save_screenshot(str(shots / f"{shot}.png"))
            return str(text)

        # As 'p2prc ui' opens it: a private file that sends the browser on with a code that
        # works once (not the token), which becomes a cookie and leaves the address bar.
        opener = me / "ui-open.html"
        assert mine.base + "/?open=" in wait_for("the opener file", opener.read_text)
        assert mine.token not in opener.read_text()
        assert opener.stat().st_mode & 0o077 == 0
        browser.get(opener.as_uri())
        wait_for("the peers page", lambda: browser.current_url == mine.base + "/peers",
                 browser=browser)
        peers = page(mine, "/peers", "peers")
        assert "alice" in peers and alice.node_id[:12] in peers and "ms" in peers
        assert "me" not in browser.find_element(By.CSS_SELECTOR, "#peers tbody").text.split()

        listed = page(mine, "/containers", "containers")
        assert first.short_id in listed and second.short_id in listed
        assert f"p2prc ssh {first.short_id}" in listed
        port = first.ports[1]["internal"]
        assert f"p2prc forward {first.short_id} {port}" in listed
        assert browser.find_element(By.CSS_SELECTOR, "button.copy").is_displayed()  # JS on

        runs = page(mine, "/runs", "runs")
        assert "half" in runs and "failed" in runs
        browser.find_element(By.LINK_TEXT, run.id).click()
        detail = wait_for("the run's page", lambda: "a task that fails" in browser.find_element(
            By.TAG_NAME, "main").text and browser.find_element(By.TAG_NAME, "main").text)
        assert f"disk full on {first.short_id}" in detail and "stdout" in detail
        browser.save_screenshot(str(shots / "run.png"))

        specs = page(mine, "/specs?peer=alice", "specs")
        assert "Specs of alice (127.0.0.1:" in specs and "cores" in specs

        # Remove, from the page; the engine no longer has it.
        page(mine, "/containers")
        click_and_confirm(browser, f"form[data-confirm='Remove {first.short_id}?']")
        wait_for("the removal's note", lambda: f"Removed {first.short_id}" in browser.find_element(
            By.TAG_NAME, "main").text, browser=browser)
        assert not alive(engine, first.id)
        assert first.short_id not in browser.find_element(By.ID, "containers").text

        # The host's own view: the other container, its owner under the name trusted.
        browser.get(hosts.url)
        view = wait_for("the host's page", lambda: second.short_id in page(hosts, "/host") and
                        browser.find_element(By.ID, "leases").text)
        assert "me" in view.split() and "running" in view
        browser.save_screenshot(str(shots / "host.png"))
        click_and_confirm(browser, f"form[data-confirm='Kill {second.id[:12]}?']")
        wait_for("the kill's note", lambda: f"Killed {second.id[:12]}" in browser.find_element(
            By.TAG_NAME, "main").text)
        assert not alive(engine, second.id)
        # Its owner's page says so, and offers to forget it rather than to log in.
        owners = page(mine, "/containers")
        assert "its host no longer runs it" in owners and "Forget" in owners
        browser.get(hosts.base + "/host")

        # An invite made on the page, redeemed from another home.
        browser.find_element(By.CSS_SELECTOR, "form[action='/host/invite'] button").click()
        token = wait_for("the invite", lambda: browser.find_element(
            By.ID, "invite-token").get_attribute("value"))
        assert browser.find_element(By.CSS_SELECTOR, ".invite img").get_attribute(
            "src").startswith("data:image/svg+xml")
        browser.save_screenshot(str(shots / "host-invite.png"))
        friend = tmp_path / "friend"
        joined = cli(friend, "join", token, "--json")
        assert joined.returncode == 0, joined.stderr
        friend_id = NodeIdentity.load_or_create(friend).node_id
        assert friend_id in page(hosts, "/host")

        # Live: a peer learned behind the page's back shows without a reload, as text.
        browser.get(mine.base + "/peers")
        browser.execute_script("window.notReloaded = true")
        late = sign_record(NodeIdentity.generate(), {
            "name": "late <b>bold</b>", "addresses": ["127.0.0.1"], "port": 9, "seq": 1,
            "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})
        PeerTable(me, node.node_id, allow_loopback=True).merge([late])
        wait_for("the live row", lambda: "late <b>bold</b>" in browser.find_element(
            By.ID, "peers").text, timeout=60)
        assert browser.execute_script("return window.notReloaded") is True
        assert browser.find_elements(By.CSS_SELECTOR, "#peers b") == []

        # An update with its progress, then its summary, on the same page.
        browser.find_element(By.CSS_SELECTOR, "form[action='/peers/update'] button").click()
        summary = wait_for("the update's summary", lambda: "Updated" in browser.find_element(
            By.ID, "update").text and browser.find_element(By.ID, "update").text)
        assert "asked" in summary

        # A phone-wide window: nothing scrolls sideways but the tables' own boxes.
        browser.set_window_size(390, 844)
        for path in ("/peers", "/containers", "/runs", "/specs"):
            page(mine, path, None)
            wide = browser.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 1, f"{path} is {wide} px wider than a phone"
        page(mine, "/peers", "peers-phone")
    finally:
        mine.stop()
        hosts.stop()


def test_pages_read_without_javascript(tmp_path: Path, friend: LiveServer) -> None:
    """What a browser without JavaScript (or curl) gets: the whole table, server-rendered."""
    import http.cookiejar
    import urllib.request

    me = tmp_path / "me"
    assert cli(me, "peers", "add", friend.peer()).returncode == 0
    ui = UI(me)
    try:
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        opener.open(ui.url, timeout=30).close()  # the token, for a cookie
        with opener.open(ui.base + "/peers", timeout=30) as reply:
            text = reply.read().decode()
        assert "alice" in text and friend.node_id in text
        with opener.open(ui.base + "/peers?sort=latency&order=desc", timeout=30) as reply:
            assert 'class="sorted desc"' in reply.read().decode()
    finally:
        ui.stop()


class Stranger:
    """Another web server on 127.0.0.1 (a port 'p2prc forward' serves from a peer's
    container, say): the cookies it was sent, and a page that sends the browser to
    ``target``."""

    def __init__(self) -> None:
        self.cookies: list[str] = []
        self.target = "about:blank"
        stranger = self

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                stranger.cookies.append(self.headers.get("Cookie") or "")
                body = (f'<meta http-equiv="refresh" content="0;url={stranger.target}">'
                        if self.path == "/go" else "<p>a stranger's page</p>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_token_and_its_cookie_stay_with_the_dashboard(tmp_path: Path, browser: Any,
                                                          live_server: LiveServer) -> None:
    """A page that learned the dashboard's token (a service on 127.0.0.1 the cookie went
    to, once) cannot sign the browser in with it, nor make the dashboard dial and pin a
    peer; the user's own ways in work; and the cookie goes to no other local service."""
    from selenium.webdriver.common.by import By

    me = tmp_path / "me"
    ui, stranger = UI(me, opens=True), Stranger()
    try:
        def shown() -> str:
            return str(browser.find_element(By.TAG_NAME, "body").text)

        # The stranger's page sends the browser to the dashboard with the token, on to a
        # page that would dial a peer the user never chose.
        stranger.target = f"{ui.base}/specs?token={ui.token}&peer={live_server.peer()}"
        browser.get(stranger.url + "/go")
        wait_for("the refusal", lambda: "paste the address" in shown(), browser=browser)
        browser.get(ui.base + "/peers")
        wait_for("no access", lambda: "No access" in shown(), browser=browser)
        assert not (me / "peers.json").exists() or live_server.node_id not in (
            me / "peers.json").read_text()

        # The user's own ways in: the page 'p2prc ui' opened (a file), the address typed.
        browser.get((me / "ui-open.html").as_uri())
        wait_for("the peers page", lambda: browser.current_url == ui.base + "/peers",
                 browser=browser)
        browser.delete_all_cookies()
        browser.get(ui.url)
        wait_for("the peers page again", lambda: browser.current_url == ui.base + "/peers"
                 and "Peers" in shown(), browser=browser)

        # Another local service gets none of the dashboard's cookies.
        browser.get(stranger.url + "/look")
        wait_for("the stranger's page", lambda: "a stranger's page" in shown())
        assert not any("p2prc_ui_" in sent for sent in stranger.cookies), stranger.cookies
    finally:
        ui.stop()
        stranger.close()
