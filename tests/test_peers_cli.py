"""p2prc peers add / ls / update against real servers on loopback."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import P2PRC, LiveServer, free_port, serve_tls, start_server, web

pytestmark = pytest.mark.integration


def p2prc(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # The client, too, advertises loopback only: no test makes anything dial real interfaces.
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "P2PRC_HOME": str(home),
                               "P2PRC_ALLOW_LOOPBACK": "true",
                               "P2PRC_ADVERTISE_ADDRESSES": "127.0.0.1", **env})


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[LiveServer]]:
    started = [start_server(tmp_path / f"s{i}") for i in range(3)]
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def node_id(home: Path) -> str:
    return p2prc(home, "id").stdout.strip()


def test_add_list_and_update(servers: list[LiveServer], tmp_path: Path) -> None:
    me = tmp_path / "me"
    a, b, c = servers
    # a knows b, b knows c; we know only a.
    assert p2prc(a.home, "peers", "add", b.peer()).returncode == 0
    assert p2prc(b.home, "peers", "add", c.peer()).returncode == 0
    added = p2prc(me, "peers", "add", a.peer())
    assert added.returncode == 0, added.stderr
    assert f"at {a.peer()}" in added.stdout and " ms" in added.stdout

    update = p2prc(me, "peers", "update", "--hops", "3", "--json")
    assert update.returncode == 0, update.stderr
    summary = json.loads(update.stdout)
    assert node_id(c.home) in summary["added"]  # b was learned of already when a was added
    listed = json.loads(p2prc(me, "peers", "ls", "--json").stdout)
    assert {p["node_id"] for p in listed} == {node_id(s.home) for s in servers}
    for peer in listed:
        assert peer["latency_ms"] is not None and peer["latency_ms"] < 100
        assert peer["address"].startswith("[::1]:")  # IPv6 first, where it works
    scores = [p["score"] for p in listed]
    assert scores == sorted(scores, reverse=True)
    table = p2prc(me, "peers", "ls")
    assert "latency" in table.stdout and "ms" in table.stdout
    # We run no server: no server asked records us as a peer to dial (its refresh would
    # fail on us every time). A server of ours would be recorded (test_server_live).
    held_by_c = json.loads(p2prc(c.home, "peers", "ls", "--json").stdout)
    assert node_id(me) not in {p["node_id"] for p in held_by_c}


def test_original_spellings(servers: list[LiveServer], tmp_path: Path) -> None:
    me = tmp_path / "me"
    assert p2prc(me, "--as", servers[0].peer()).returncode == 0
    assert node_id(servers[0].home) in p2prc(me, "--ls").stdout
    update = p2prc(me, "--us")
    assert update.returncode == 0 and "asked 1 peer(s)" in update.stdout


def test_a_peer_by_name_or_id_and_bandwidth_from_speedtest(servers: list[LiveServer],
                                                           tmp_path: Path) -> None:
    me = tmp_path / "me"
    target = servers[0]
    p2prc(me, "peers", "add", target.peer())
    peer_id = node_id(target.home)
    specs = p2prc(me, "specs", peer_id, "--json")
    assert specs.returncode == 0 and json.loads(specs.stdout)["cpu"]["threads"] >= 1
    test = p2prc(me, "speedtest", peer_id, "--bytes", "4M", "--download-only")
    assert test.returncode == 0, test.stderr
    listed = json.loads(p2prc(me, "peers", "ls", "--json").stdout)
    assert listed[0]["bandwidth_mbps"] > 0


def test_add_errors_are_one_line(tmp_path: Path) -> None:
    dead = p2prc(tmp_path, "peers", "add", f"127.0.0.1:{free_port()}")
    assert dead.returncode == 1 and "cannot reach" in dead.stderr
    assert "Traceback" not in dead.stderr
    empty = p2prc(tmp_path, "peers", "update")
    assert empty.returncode == 1 and "the table is empty" in empty.stderr


def test_adding_yourself_is_refused(tmp_path: Path) -> None:
    server = start_server(tmp_path / "me")
    try:
        result = p2prc(server.home, "peers", "add", server.peer())
        assert result.returncode == 1 and "is this node itself" in result.stderr
    finally:
        server.stop()


class Flood(http.server.BaseHTTPRequestHandler):
    """A hostile peer: a valid node record, then a huge table."""

    record: dict[str, object] = {}

    def do_GET(self) -> None:  # noqa: N802
        self._send(json.dumps(self.record).encode())

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(b'{"records": [' + b'{"x": 1},' * 2_000_000 + b'{}], "cursor": "c"}')

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_an_oversized_table_is_cut_off_and_nothing_breaks(tmp_path: Path) -> None:
    from p2prc_core.identity import NodeIdentity
    from p2prc_core.records import sign_record

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flood)
    flood = NodeIdentity.generate()
    serve_tls(server, flood, tmp_path / "flood")  # a node with a valid key, and a flood
    Flood.record = sign_record(flood, {
        "name": "flood", "addresses": ["127.0.0.1"], "port": server.server_address[1],
        "seq": 1, "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        me = tmp_path / "me"
        added = p2prc(me, "peers", "add", f"127.0.0.1:{server.server_address[1]}",
                      P2PRC_MAX_TABLE_BYTES="100000")
        assert added.returncode == 0, added.stderr  # the record itself was fine
        update = p2prc(me, "peers", "update", "--json", P2PRC_MAX_TABLE_BYTES="100000")
        assert update.returncode == 0
        failed = json.loads(update.stdout)["failed"]
        assert "over 100000 bytes" in next(iter(failed.values()))
        assert len(json.loads(p2prc(me, "peers", "ls", "--json").stdout)) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_unchanged_table_is_304_with_an_etag(servers: list[LiveServer]) -> None:
    url = servers[0].url() + "/v1/peers"
    first = web.get(url, timeout=5)
    assert first.status_code == 200 and first.headers["etag"]
    again = web.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=5)
    assert again.status_code == 304 and again.content == b""
    p2prc(servers[0].home, "peers", "add", servers[1].peer())
    changed = web.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=5)
    assert changed.status_code == 200 and len(changed.json()["records"]) == 1
    since = web.get(url, params={"since": changed.json()["cursor"]}, timeout=5).json()
    assert since["records"] == []


def test_a_running_server_refreshes_from_its_bootstrap_peers(servers: list[LiveServer],
                                                             tmp_path: Path) -> None:
    a, b, _ = servers
    fresh = start_server(tmp_path / "fresh", env={"P2PRC_BOOTSTRAP": a.peer(),
                                                  "P2PRC_REFRESH_SECONDS": "1"})
    try:
        p2prc(a.home, "peers", "add", b.peer())
        wanted = {node_id(a.home), node_id(b.home)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            held = {p["node_id"] for p in json.loads(
                p2prc(fresh.home, "peers", "ls", "--json").stdout)}
            if held >= wanted:
                break
            time.sleep(0.5)
        assert held >= wanted, fresh.output()
        assert node_id(fresh.home) in {p["node_id"] for p in json.loads(
            p2prc(a.home, "peers", "ls", "--json").stdout)}
        assert "peer table refreshed" in fresh.output()
    finally:
        fresh.stop()


def test_adding_a_known_peer_says_so_and_homes_are_private(servers: list[LiveServer],
                                                           tmp_path: Path) -> None:
    import stat

    me = tmp_path / "fresh" / "me"
    first = p2prc(me, "peers", "add", servers[0].peer())
    assert first.returncode == 0 and first.stdout.startswith("added "), first.stderr
    again = p2prc(me, "peers", "add", servers[0].peer())
    assert again.returncode == 0 and again.stdout.startswith("already known, updated ")
    assert stat.S_IMODE(me.stat().st_mode) == 0o700  # made on first use, as init makes it
