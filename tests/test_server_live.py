"""A real ``p2prc server`` process, reached over real sockets on 127.0.0.1 and ::1."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import wait_for

from conftest import (
    P2PRC,
    LiveServer,
    free_port,
    ipv6_loopback_works,
    require,
    start_server,
    web,
)
from p2prc_core.tls import client_context

pytestmark = pytest.mark.integration


def p2prc(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2PRC_HOME": str(home)}
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_reached_over_ipv4_and_ipv6(live_server: LiveServer) -> None:
    require(ipv6_loopback_works(), "no IPv6 loopback on this machine")
    for host in ("127.0.0.1", "::1"):
        health = web.get(live_server.url(host) + "/v1/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        node = web.get(live_server.url(host) + "/v1/node", timeout=5).json()
        assert node["port"] == live_server.port


def test_one_log_line_per_request_and_clean_stop_on_sigterm(live_server: LiveServer) -> None:
    for path in ("/v1/health", "/v1/specs", "/v1/missing"):
        web.get(live_server.url() + path, timeout=5)
    assert live_server.stop(signal.SIGTERM) == 0
    log = live_server.output()
    assert log.count('"GET /v1/health HTTP/1.1" 200') == 2  # the readiness probe, then ours
    assert '"GET /v1/specs HTTP/1.1" 200' in log
    assert '"GET /v1/missing HTTP/1.1" 404' in log
    assert "Traceback" not in log


def test_ctrl_c_stops_it_cleanly(live_server: LiveServer) -> None:
    assert live_server.stop(signal.SIGINT) == 0


def test_errors_are_json_over_the_wire(live_server: LiveServer) -> None:
    base = live_server.url()
    missing = web.get(base + "/v1/nope", timeout=5)
    assert missing.status_code == 404 and missing.json()["description"]
    wrong = web.put(base + "/v1/specs", timeout=5)
    assert wrong.status_code == 405 and wrong.json()["title"]
    bad = web.get(base + "/v1/speedtest/download?bytes=-1", timeout=5)
    assert bad.status_code == 400


def test_oversized_upload_is_refused_before_reading_and_server_keeps_serving(
        tmp_path: Path) -> None:
    server = start_server(tmp_path / "home", env={"P2PRC_SPEEDTEST_MAX_BYTES": "100000"})
    try:
        with client_context().wrap_socket(
                socket.create_connection(("127.0.0.1", server.port), timeout=5)) as sock:
            # Declares 10 GB and sends none of it: the answer comes at once.
            sock.sendall(b"POST /v1/speedtest/upload HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 10000000000\r\n\r\n")
            head = sock.recv(4096).decode()
        assert head.startswith("HTTP/1.1 413")
        too_big = web.get(server.url() + "/v1/speedtest/download?bytes=100001", timeout=5)
        assert too_big.status_code == 413 and "97.7 KiB" in too_big.json()["description"]
        assert web.get(server.url() + "/v1/health", timeout=5).status_code == 200
    finally:
        server.stop()


def test_openapi_operations_all_answer_on_the_real_server(live_server: LiveServer) -> None:
    base = live_server.url()
    document = web.get(base + "/v1/openapi.json", timeout=5).json()
    assert document["paths"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            result = web.request(method.upper(), base + path, timeout=10,
                                   params={"bytes": "10"} if "download" in path else None,
                                   json={} if method == "post" else None)
            # Signed routes answer an unsigned request with 401; the others just answer.
            expected = 401 if "signed" in operation.get("tags", []) else 200
            assert result.status_code == expected, (method, path, result.status_code)


def test_speedtest_command_against_the_real_server(live_server: LiveServer,
                                                   tmp_path: Path) -> None:
    result = p2prc("speedtest", live_server.peer(), "--bytes", "8M", "--json",
                   home=tmp_path / "client")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    transfers = {t["direction"]: t for t in report["transfers"]}
    assert set(transfers) == {"download", "upload"}
    for transfer in transfers.values():
        assert transfer["bytes"] == 8 * 1024 * 1024
        assert transfer["mbit_per_second"] > 0
    table = p2prc("speedtest", live_server.peer(), "--bytes", "1M", home=tmp_path / "client")
    assert table.returncode == 0 and "Mbit/s" in table.stdout and "download" in table.stdout


def test_speedtest_over_ipv6(live_server: LiveServer, tmp_path: Path) -> None:
    require(ipv6_loopback_works(), "no IPv6 loopback on this machine")
    result = p2prc("speedtest", live_server.peer("::1"), "--bytes", "2M", "--download-only",
                   "--json", home=tmp_path / "client")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["transfers"][0]["bytes"] == 2 * 1024 * 1024


def test_specs_command_against_the_real_server(live_server: LiveServer, tmp_path: Path) -> None:
    result = p2prc("specs", live_server.peer(), "--json", home=tmp_path / "client")
    assert result.returncode == 0, result.stderr
    specs = json.loads(result.stdout)
    assert specs["hostname"] == socket.gethostname() and isinstance(specs["gpus"], list)
    table = p2prc("specs", live_server.peer(), home=tmp_path / "client")
    assert "cores" in table.stdout
    for gpu in specs["gpus"]:  # none on most machines; each one by name where there are
        assert f"gpu {gpu['index']}" in table.stdout and gpu["name"] in table.stdout
    if not specs["gpus"]:
        assert re.search(r"gpus\s+none", table.stdout)


def test_a_server_without_the_gpu_plugin_reports_no_gpus(tmp_path: Path) -> None:
    server = start_server(tmp_path / "host", env={"P2PRC_DISABLE_PLUGINS": "nvidia"})
    try:
        result = p2prc("specs", server.peer(), "--json", home=tmp_path / "client")
        assert result.returncode == 0, result.stderr
        assert "gpus" not in json.loads(result.stdout)  # not probed at all, on any machine
        table = p2prc("specs", server.peer(), home=tmp_path / "client")
        assert re.search(r"gpus\s+none", table.stdout)
    finally:
        server.stop()


def test_port_taken_is_one_clear_line(live_server: LiveServer, tmp_path: Path) -> None:
    result = p2prc("server", "--port", str(live_server.port), home=tmp_path / "other")
    assert result.returncode == 1
    assert f"port {live_server.port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert web.get(live_server.url() + "/v1/health", timeout=5).status_code == 200


def test_address_not_on_this_machine_is_one_clear_line(tmp_path: Path) -> None:
    result = p2prc("server", "--host", "192.0.2.254", "--port", str(free_port()),
                   home=tmp_path / "h")
    assert result.returncode == 1
    assert "not on this machine" in result.stderr and "Traceback" not in result.stderr


def test_original_spelling_dash_s_serves(tmp_path: Path) -> None:
    server = start_server(tmp_path / "h", command=("-s",))
    try:
        assert web.get(server.url() + "/v1/node", timeout=5).json()["port"] == server.port
    finally:
        assert server.stop() == 0


def test_dead_peer_is_one_clear_line(tmp_path: Path) -> None:
    result = p2prc("specs", f"127.0.0.1:{free_port()}", home=tmp_path / "h")
    assert result.returncode == 1
    assert "cannot reach 127.0.0.1:" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def not_a_node() -> Iterator[int]:
    """A plain HTTP server that is not p2prc."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_something_that_is_not_a_node_is_one_clear_line(not_a_node: int, tmp_path: Path) -> None:
    result = p2prc("specs", f"127.0.0.1:{not_a_node}", home=tmp_path / "h")
    assert result.returncode == 1
    assert "not a p2prc node" in result.stderr and "Traceback" not in result.stderr


def test_status_says_whether_the_server_runs_and_how_peers_see_this_node(
        tmp_path: Path, live_server: LiveServer) -> None:
    env = {**os.environ, "P2PRC_HOME": str(live_server.home),
           "P2PRC_PORT": str(live_server.port)}  # as the server was started
    own = json.loads(subprocess.run([P2PRC, "status", "--json"], capture_output=True,
                                    text=True, env=env, timeout=60).stdout)
    assert own["server"]["running"] is True and own["node_id"] == live_server.node_id
    assert own["transport"] == "tls"
    me = tmp_path / "me"
    stopped = json.loads(p2prc("status", "--json", home=me).stdout)
    assert stopped["server"]["running"] is False and "cannot reach" in stopped["server"]["why"]
    assert p2prc("peers", "add", live_server.peer(), home=me).returncode == 0
    # The peer saw this node's request come from 127.0.0.1, which it does not advertise.
    env = {**os.environ, "P2PRC_HOME": str(me), "P2PRC_ADVERTISE_ADDRESSES": "2001:db8::77",
           "P2PRC_ALLOW_LOOPBACK": "true"}  # a lab on one machine: loopback is a view
    seen = json.loads(subprocess.run([P2PRC, "status", "--json"], capture_output=True,
                                     text=True, env=env, timeout=60).stdout)
    assert [o["address"] for o in seen["observed"]] == ["127.0.0.1"]
    assert seen["observed"][0]["by"] == [live_server.node_id] and seen["behind_nat"] is True
    assert seen["peers"] == {"known": 1, "answering": 1, "never_answered": 0}
    table = subprocess.run([P2PRC, "status"], capture_output=True, text=True, env=env,
                           timeout=60).stdout
    assert "seen as" in table and "behind NAT" in table


def test_doctor_names_each_problem_with_its_fix(tmp_path: Path,
                                                live_server: LiveServer) -> None:
    me = tmp_path / "me"
    assert p2prc("peers", "add", live_server.peer(), home=me).returncode == 0
    env = {**os.environ, "P2PRC_HOME": str(me), "P2PRC_BACKEND": "none",
           "P2PRC_ADVERTISE_ADDRESSES": "2001:db8::77", "P2PRC_ALLOW_LOOPBACK": "true",
           "P2PRC_PORT": str(live_server.port)}  # another node's server holds this port
    result = subprocess.run([P2PRC, "doctor", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["container engine"]["result"] == "fail"
    assert "'none' backend is not installed" in checks["container engine"]["detail"]
    assert checks["server"]["result"] == "fail" and "--port" in checks["server"]["fix"]
    assert checks["clock"]["result"] == "ok" and "1 peer" in checks["clock"]["detail"]
    assert checks["reach"]["result"] == "fail" and "127.0.0.1" in checks["reach"]["detail"]
    assert "advertise_addresses" in checks["reach"]["fix"]
    table = subprocess.run([P2PRC, "doctor"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert table.returncode == 1 and "behind NAT" in table.stdout


def test_commands_beside_a_server_use_its_real_port_and_clients_are_not_servers(
        tmp_path: Path) -> None:
    from p2prc_core.peertable import PeerTable

    node = start_server(tmp_path / "node")  # port from P2PRC_PORT, not its config's 8088
    peer = start_server(tmp_path / "peer")
    try:
        beside = {**os.environ, "P2PRC_HOME": str(node.home), "P2PRC_ALLOW_LOOPBACK": "true",
                  "P2PRC_ADVERTISE_ADDRESSES": "127.0.0.1"}  # as a user's shell: no port
        status = json.loads(subprocess.run([P2PRC, "status", "--json"], capture_output=True,
                                           text=True, env=beside, timeout=60).stdout)
        assert status["server"]["running"] is True, status["server"]  # found on its port
        with pytest.raises(RuntimeError, match="already runs for this home"):
            start_server(node.home)  # a second server for the same node is refused
        invite = subprocess.run([P2PRC, "invite", "--json"], capture_output=True, text=True,
                                env=beside, timeout=60)
        assert json.loads(invite.stdout)["port"] == node.port and "WARNING" not in \
            invite.stderr
        added = subprocess.run([P2PRC, "peers", "add", peer.peer()], capture_output=True,
                               text=True, env=beside, timeout=60)
        assert added.returncode == 0, added.stderr
        held = PeerTable(peer.home, peer.node_id).load()
        assert held[node.node_id].port == node.port  # what the peer will dial
        # A client with no server of its own is not recorded as one to dial.
        client = tmp_path / "client"
        assert p2prc("peers", "add", peer.peer(), home=client).returncode == 0
        client_id = json.loads(p2prc("id", "--json", home=client).stdout)["node_id"]
        assert client_id not in PeerTable(peer.home, peer.node_id).load()
        lonely = p2prc("invite", home=client)
        assert "no p2prc server runs for this node" in lonely.stderr
    finally:
        node.stop()
        peer.stop()
    assert not (node.home / "server.json").exists()  # gone with the server


@pytest.mark.docker
def test_the_master_forks_its_workers_holding_no_engine_or_database_connection(
        tmp_path: Path, engine: object) -> None:
    """The master asks the engine (the reconcile) and server.db before it starts serving;
    it closes those connections before gunicorn forks, so neither it nor any worker holds
    a dozen idle sockets to the engine and server.db's descriptors for its whole life (it
    did: a restarted master held 20 to 25 descriptors where one on a new home held 15)."""
    server = start_server(tmp_path / "host", env={"P2PRC_WORKERS": "2"})
    try:
        master = server.proc.pid

        def links(pid: int) -> set[str]:
            found = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except FileNotFoundError:
                    pass  # closed meanwhile
            return found

        def sockets(pid: int) -> set[str]:
            return {link for link in links(pid) if link.startswith("socket:")}

        def workers() -> list[int]:
            return [int(p) for task in os.listdir(f"/proc/{master}/task")
                    for p in open(f"/proc/{master}/task/{task}/children").read().split()]

        files = links(master)
        assert not [f for f in files if "server.db" in f], files
        held = sockets(master)
        assert len(held) == 2, held  # the TCP listener and the UDP socket, nothing else
        wait_for(lambda: len(workers()) == 2, what="both workers")
        for worker in workers():  # inherited from the master: those two only
            assert sockets(worker) & sockets(master) == held
    finally:
        server.stop()


def test_server_db_connections_keep_a_small_page_cache(tmp_path: Path) -> None:
    """Every request writes server.db (its nonce), from each thread's own connection.
    SQLite's default page cache, 2 MB for each, filled slowly: a worker grew by megabytes
    over hours (the soak: +5% in 30 minutes, steadily; with the small cache, flat after the
    first requests). Each connection keeps 256 KiB at most, whatever thread opens it."""
    import threading

    from p2prc_core.storage import SharedDB

    shared = SharedDB(tmp_path / "server.db", "CREATE TABLE IF NOT EXISTS t (x);")
    sizes = []

    def read() -> None:
        sizes.append(shared.db().execute("PRAGMA cache_size").fetchone()[0])

    read()
    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert sizes == [-256, -256]
