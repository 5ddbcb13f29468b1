"""Every peer is a stranger: what a peer says (its name, its replies) cannot redirect the
user, run code, write outside the home, or garble or crash the user's terminal."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from conftest import P2PRC, LiveServer, serve_tls, web
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.records import sign_record
from p2prc_core.signing import sign_request
from p2prc_core.tls import client_context
from p2prc_core.trust import TrustStore

pytestmark = pytest.mark.integration

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"


def p2prc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "P2PRC_HOME": str(home)})


def record(name: str, addresses: list[str], port: int = 8088,
           identity: NodeIdentity | None = None) -> dict[str, Any]:
    return sign_record(identity or NodeIdentity.generate(), {
        "name": name, "addresses": addresses, "port": port, "seq": 1,
        "time": int(time.time()), "specs": {"gpus": ["[blink]GPU[/]"]}, "metadata": {},
        "version": "x"})


def plant(home: Path, *records: dict[str, Any]) -> None:
    """Records in the user's table, as discovery would put them there."""
    PeerTable(home, NodeIdentity.load_or_create(home).node_id).merge(list(records))


def test_peer_names_are_shown_as_they_are_and_cannot_crash_a_listing(tmp_path: Path) -> None:
    me = tmp_path / "me"
    plant(me, record("[/]", ["fd42::1"]), record("[bold red]x[/] (verified)", ["fd42::2"]),
          record("\x1b[2J\x1b]0;owned\x07evil\u202egnp.exe", ["fd42::3"]))
    listed = p2prc(me, "peers", "ls")
    assert listed.returncode == 0, listed.stderr
    assert "[/]" in listed.stdout and "[bold red]x[/] (verified)" in listed.stdout
    assert "[blink]GPU[/]" in listed.stdout
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert "\u202e" not in listed.stdout and "evil" in listed.stdout


def test_specs_of_odd_shapes_in_records_list_without_a_crash(tmp_path: Path) -> None:
    me = tmp_path / "me"
    for gpus in ([1, {"x": 1}, "real GPU"], "abc", 7):
        odd = record(f"odd-{type(gpus).__name__}", ["fd42::7"])
        odd = sign_record(NodeIdentity.generate(), {
            **{k: odd[k] for k in ("name", "addresses", "port", "seq", "time", "metadata",
                                   "version")}, "specs": {"gpus": gpus}})
        plant(me, odd)
    listed = p2prc(me, "peers", "ls")
    assert listed.returncode == 0, listed.stderr
    assert "real GPU" in listed.stdout and "Traceback" not in listed.stderr


def test_a_peers_free_gpu_count_is_believed_only_within_its_gpus(tmp_path: Path) -> None:
    me = tmp_path / "me"
    for name, free in (("many", 10**9), ("minus", -5), ("text", "all of them"), ("yes", True),
                       ("two", 2)):
        plant(me, sign_record(NodeIdentity.generate(), {
            "name": name, "addresses": ["fd42::8"], "port": 8088, "seq": 1,
            "time": int(time.time()), "metadata": {}, "version": "x",
            "specs": {"gpus": ["H200", "H200", "H200"], "gpus_free": free}}))
    listed = p2prc(me, "peers", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["gpus_free"] for r in json.loads(listed.stdout)} == \
        {"many": 3, "minus": 0, "text": 0, "yes": 0, "two": 2}
    table = p2prc(me, "peers", "ls", "--gpu")
    assert "3x H200 (3 free)" in table.stdout and "3x H200 (2 free)" in table.stdout
    assert "minus" not in table.stdout and "(0 free)" not in table.stdout


def test_ipv6_endpoints_show_whole_in_tables(tmp_path: Path, live_server: LiveServer) -> None:
    me = tmp_path / "me"
    added = p2prc(me, "peers", "add", live_server.peer("::1"))
    assert added.returncode == 0, added.stderr
    listed = p2prc(me, "peers", "ls")
    assert f"[::1]:{live_server.port}" in listed.stdout


def test_a_name_that_reads_as_an_address_never_redirects(tmp_path: Path,
                                                        live_server: LiveServer) -> None:
    me = tmp_path / "me"
    # A stranger's record named as the user's peer address, pointing somewhere else.
    plant(me, record(live_server.peer(), ["fd42::dead"]))
    result = p2prc(me, "specs", live_server.peer(), "--json")
    assert result.returncode == 0, result.stderr  # the address the user typed was used
    assert json.loads(result.stdout)["hostname"]


def test_names_resolve_only_when_unambiguous_and_the_users_own_win(
        tmp_path: Path, live_server: LiveServer) -> None:
    me = tmp_path / "me"
    twin_a, twin_b = record("twin", ["fd42::a"]), record("twin", ["fd42::b"])
    impostor = record("friend", ["fd42::c"])
    plant(me, twin_a, twin_b, impostor)
    ambiguous = p2prc(me, "specs", "twin")
    assert ambiguous.returncode == 1 and "2 peers are named 'twin'" in ambiguous.stderr
    # The user names the real server "friend": that wins over the stranger's own name.
    added = p2prc(me, "peers", "add", live_server.peer(), "--name", "friend")
    assert added.returncode == 0, added.stderr
    specs = p2prc(me, "specs", "friend", "--json")
    assert specs.returncode == 0, specs.stderr
    by_prefix = p2prc(me, "specs", live_server.node_id[:8], "--json")
    assert by_prefix.returncode == 0, by_prefix.stderr
    listed = json.loads(p2prc(me, "peers", "ls", "--json").stdout)
    mine = next(p for p in listed if p["node_id"] == live_server.node_id)
    assert mine["name"] == "friend"
    bad = p2prc(me, "peers", "add", live_server.peer(), "--name", "10.0.0.1")
    assert bad.returncode == 2 and "not an address" in bad.stderr


class FakeHost(http.server.BaseHTTPRequestHandler):
    """A host with a valid node key whose answers to a create are lies."""

    reply: dict[str, Any] = {}
    deleted: list[str] = []
    specs: dict[str, Any] = {}

    def do_GET(self) -> None:  # noqa: N802
        self._send(self.specs if self.path == "/v1/specs" else {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(self.reply, 201)

    def do_DELETE(self) -> None:  # noqa: N802
        FakeHost.deleted.append(self.path)
        self._send({"removed": self.path})

    def _send(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_host(tmp_path: Path) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHost)
    serve_tls(server, NodeIdentity.generate(), tmp_path / "fake")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHost.deleted = []
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


GOOD = {"id": "a" * 64, "image": "p2prc/base:latest", "created": 1, "expires": 2,
        "ports": [{"name": "ssh", "internal": 22, "external": 42000}],
        "ssh": {"port": 42000, "host_key": HOST_KEY}}


@pytest.mark.parametrize("lie", [
    {"ssh": {"port": "{{ lookup('pipe', 'touch /tmp/p2prc-owned') }}", "host_key": HOST_KEY},
     "ports": [{"name": "ssh", "internal": 22,
                "external": "{{ lookup('pipe', 'touch /tmp/p2prc-owned') }}"}]},
    {"id": "/../../../xy"},
    {"ssh": {"port": 42000, "host_key": HOST_KEY + "\n[evil]:22 ssh-ed25519 AAAA"}},
    {"image": "x\x1b[2J"},
    {"expires": -5},
    {"created": "yesterday"},
])
def test_a_lying_reply_to_touch_is_refused_and_nothing_is_kept(
        tmp_path: Path, fake_host: int, lie: dict[str, Any]) -> None:
    FakeHost.reply = {**GOOD, **lie}
    me = tmp_path / "me"
    result = p2prc(me, "touch", f"127.0.0.1:{fake_host}")
    assert result.returncode == 1
    assert "is not a container" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("first contact") == 1
    assert not (me / "containers.json").exists() or \
        json.loads((me / "containers.json").read_text()) == {}
    assert not list(tmp_path.glob("**/xy*")) and not Path("/tmp/p2prc-owned").exists()
    # What the host did start is removed only when its id is well-formed.
    well_formed = isinstance(FakeHost.reply.get("id"), str) and FakeHost.reply["id"] == "a" * 64
    assert FakeHost.deleted == ([f"/v1/containers/{'a' * 64}"] if well_formed else [])


# -- bundles are code that runs on the client ----------------------------------------------------

def bundle(root: Path, site: str, toml: str = 'name = "b"\n') -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "p2prc.toml").write_text(toml)
    (root / "site.yml").write_text(site)
    return root


TASK = "  tasks:\n    - command: id\n"


@pytest.mark.parametrize("site, found", [
    ("- hosts: all\n  tasks:\n    - command: id\n      delegate_to: localhost\n",
     "site.yml: delegate_to"),
    ("- hosts: all\n  tasks:\n    - local_action: command id\n", "site.yml: local_action"),
    ("- hosts: all\n  connection: local\n" + TASK, "site.yml: connection"),
    ("- hosts: localhost\n" + TASK, "hosts: 'localhost'"),
    ("- hosts: all\n  vars:\n    ansible_connection: local\n" + TASK,
     "site.yml: ansible_connection"),
])
def test_a_bundle_that_reaches_outside_its_containers_runs_only_when_allowed(
        tmp_path: Path, site: str, found: str) -> None:
    me = tmp_path / "me"
    assert p2prc(me, "playbooks", "add", str(bundle(tmp_path / "b", site))).returncode == 0
    refused = p2prc(me, "run", "b", "--on", "abcdef123456")
    assert refused.returncode == 1
    assert "would run outside its containers" in refused.stderr and found in refused.stderr
    assert "--allow-local" in refused.stderr
    allowed = p2prc(me, "run", "b", "--on", "abcdef123456", "--allow-local")
    assert allowed.returncode == 1 and "no tracked container" in allowed.stderr


def test_included_task_files_are_checked_too(tmp_path: Path) -> None:
    path = bundle(tmp_path / "b", "- hosts: all\n  tasks:\n    - include_tasks: more.yml\n")
    (path / "more.yml").write_text("- command: cat /etc/hostname\n  delegate_to: 127.0.0.1\n")
    me = tmp_path / "me"
    assert p2prc(me, "playbooks", "add", str(path)).returncode == 0
    refused = p2prc(me, "run", "b", "--on", "abcdef123456")
    assert refused.returncode == 1 and "more.yml: delegate_to" in refused.stderr


@pytest.mark.parametrize("variable", ["ansible_connection", "ansible_host", "p2prc_ports",
                                      "hostvars", "inventory_hostname"])
def test_variables_that_change_where_ansible_connects_are_refused(tmp_path: Path,
                                                                  variable: str) -> None:
    me = tmp_path / "me"
    path = bundle(tmp_path / "b", "- hosts: all\n" + TASK,
                  f'name = "b"\n[variables]\n{variable} = "local"\n')
    added = p2prc(me, "playbooks", "add", str(path))
    assert added.returncode == 1 and f"may not set {variable}" in added.stderr
    good = bundle(tmp_path / "good", "- hosts: all\n" + TASK, 'name = "good"\n')
    assert p2prc(me, "playbooks", "add", str(good)).returncode == 0
    extra = p2prc(me, "run", "good", "--on", "abcdef123456", "-e", f"{variable}=local")
    assert extra.returncode == 1 and f"-e {variable}: may not be set" in extra.stderr


def test_links_out_of_a_bundle_are_refused(tmp_path: Path) -> None:
    me = tmp_path / "me"
    secret = NodeIdentity.load_or_create(me)  # the node key a link would copy
    assert secret.node_id
    to_key = bundle(tmp_path / "key", "- hosts: all\n" + TASK)
    (to_key / "files").mkdir()
    (to_key / "files" / "k").symlink_to(me / "node.key")
    result = p2prc(me, "playbooks", "add", str(to_key))
    assert result.returncode == 1 and "files/k links outside the bundle" in result.stderr
    to_dir = bundle(tmp_path / "dir", "- hosts: all\n" + TASK)
    (to_dir / "everything").symlink_to("/usr")
    result = p2prc(me, "playbooks", "add", str(to_dir))
    assert result.returncode == 1 and "link to a directory" in result.stderr
    assert not (me / "playbooks" / "b").exists()
    inside = bundle(tmp_path / "inside", "- hosts: all\n" + TASK)
    (inside / "also.yml").symlink_to(inside / "site.yml")  # a link within: copied as a file
    assert p2prc(me, "playbooks", "add", str(inside)).returncode == 0
    copied = me / "playbooks" / "b" / "also.yml"
    assert copied.is_file() and not copied.is_symlink()


@pytest.mark.parametrize("source, words", [
    ("--upload-pack=touch /tmp/p2prc-owned", "is not a directory or a git URL"),
    ("-u", "is not a directory or a git URL"),
])
def test_a_source_is_never_an_option_to_git(tmp_path: Path, source: str, words: str) -> None:
    result = p2prc(tmp_path / "me", "playbooks", "add", "--", source)
    assert result.returncode == 1 and words in result.stderr
    assert not Path("/tmp/p2prc-owned").exists()


def test_names_match_whole(tmp_path: Path) -> None:
    path = bundle(tmp_path / "b", "- hosts: all\n" + TASK, 'name = "http\\n"\n')
    result = p2prc(tmp_path / "me", "playbooks", "add", str(path))
    assert result.returncode == 1 and "name must be" in result.stderr
    assert p2prc(tmp_path / "me", "run", "http\n", "--on", "x").returncode == 1


# -- no 500s from input ------------------------------------------------------------------------

def test_hostile_input_is_a_clear_4xx_never_a_500(tmp_path: Path,
                                                  live_server: LiveServer) -> None:
    base = live_server.url()
    deep = web.post(base + "/v1/peers", content=b"[" * 100_000, timeout=10,
                    headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "deeper" in deep.json()["description"]
    for count in ("²", "١٠", "1e3", "-1"):
        answer = web.get(base + "/v1/speedtest/download", params={"bytes": count}, timeout=5)
        assert answer.status_code == 400, count
    cursor = web.get(base + "/v1/peers", timeout=5).json()["cursor"]
    epoch = cursor.split(":")[0]
    for since in (f"{epoch}:²", f"{epoch}:١٠", "x" * 65):
        answer = web.get(base + "/v1/peers", params={"since": since}, timeout=5)
        assert answer.status_code in (200, 400), since
    nested: Any = {}
    for _ in range(20):
        nested = {"n": nested}
    sneaky = record("deep", ["fd42::9"])
    sneaky["metadata"] = nested  # (the signature no longer matches either: dropped)
    exchange = web.post(base + "/v1/peers", json={"records": [sneaky]}, timeout=5)
    assert exchange.status_code == 200 and exchange.json()["accepted"] == 0
    caller = NodeIdentity.generate()
    TrustStore(live_server.home).add(caller.node_id, "caller")
    body = b'{"ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA x", "cpus": NaN}'
    headers = {**sign_request(caller, "POST", "/v1/containers", "", body, live_server.node_id),
               "Content-Type": "application/json"}
    nan = web.post(base + "/v1/containers", content=body, headers=headers, timeout=5)
    assert nan.status_code == 400 and "NaN is not a JSON number" in nan.json()["description"]
    assert "Traceback" not in live_server.output() and '" 500 ' not in live_server.output()


def test_chunked_bodies_are_read_and_bodies_without_a_length_refused(
        live_server: LiveServer) -> None:
    base = live_server.url()
    chunks = (b"x" * 10_000 for _ in range(30))  # no Content-Length: sent in chunks
    upload = web.post(base + "/v1/speedtest/upload", content=chunks, timeout=10)
    assert upload.status_code == 200 and upload.json()["bytes"] == 300_000
    parts = (part for part in (b'{"records": [', b"], ", b'"since": null}'))
    exchange = web.post(base + "/v1/peers", content=parts, timeout=5,
                        headers={"Content-Type": "application/json"})
    assert exchange.status_code == 200 and "cursor" in exchange.json()
    with client_context().wrap_socket(socket.create_connection(
            ("127.0.0.1", live_server.port), timeout=5)) as raw:
        raw.sendall(b"POST /v1/speedtest/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")


# -- table poisoning ------------------------------------------------------------------------------

def test_one_source_adds_only_its_allowance_of_new_peers(tmp_path: Path) -> None:
    from conftest import start_server

    server = start_server(tmp_path / "host", env={"P2PRC_EXCHANGE_NEWCOMERS_PER_MINUTE": "20"})
    try:
        known = record("known", ["2001:db8::1"])
        first = web.post(server.url() + "/v1/peers", json={"records": [known]}, timeout=5)
        assert first.status_code == 200 and first.json()["accepted"] == 1
        for batch in range(3):
            junk = [record(f"junk{batch}-{i}", [f"2001:db8::{batch}:{i}"]) for i in range(50)]
            answer = web.post(server.url() + "/v1/peers", json={"records": junk}, timeout=10)
            assert answer.status_code == 200
        held = PeerTable(server.home).load()
        assert len(held) == 20  # the known peer and 19 of 150 junk records
    finally:
        server.stop()


def test_an_update_spends_a_bounded_time_on_each_peer(tmp_path: Path) -> None:
    """16 junk peers, each with 8 addresses where something accepts a connection and never
    answers: the update ends within one peer's time budget, not 16 x 8 timeouts."""
    tarpit = socket.create_server(("0.0.0.0", 0))
    held: list[socket.socket] = []

    def swallow() -> None:
        while True:
            try:
                held.append(tarpit.accept()[0])
            except OSError:
                return

    threading.Thread(target=swallow, daemon=True).start()
    port = tarpit.getsockname()[1]
    me = tmp_path / "me"
    table = PeerTable(me, NodeIdentity.load_or_create(me).node_id, allow_loopback=True)
    table.merge([record(f"tarpit{i}", [f"127.0.0.{a}" for a in range(2, 10)], port)
                 for i in range(16)])
    try:
        started = time.monotonic()
        update = subprocess.run(
            [P2PRC, "peers", "update", "--hops", "1", "--json"], capture_output=True,
            text=True, timeout=120, env={**os.environ, "P2PRC_HOME": str(me),
                                         "P2PRC_ALLOW_LOOPBACK": "true",
                                         "P2PRC_REQUEST_TIMEOUT": "1",
                                         "P2PRC_PEER_TIME_BUDGET": "2",
                                         "P2PRC_UPDATE_FANOUT": "16"})  # ask all at once
        took = time.monotonic() - started
        failed = json.loads(update.stdout)["failed"]
        assert len(failed) == 16 and all("gave up after 2 s" in f for f in failed.values())
        assert took < 8, took  # without the budget: 8 addresses x 1 s, for each hop's peers
    finally:
        tarpit.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        tarpit.close()
        for conn in held:
            conn.close()


def test_specs_a_host_sends_in_odd_shapes_print_without_a_crash(tmp_path: Path,
                                                                 fake_host: int) -> None:
    FakeHost.specs = {"hostname": "[b]x", "cpu": "fast", "memory": {"total": "lots"},
                      "load": {"1m": "high", "5m": None, "15m": 10 ** 400}, "disk": [1],
                      "os": 3,
                      "gpus": [{"index": 0, "name": "G", "memory_total": "big"}, "junk",
                               {"index": [1], "name": "H", "free": [True]},
                               {"index": 2, "name": "I", "free": False,
                                "memory_total": 10 ** 400}]}
    result = p2prc(tmp_path / "me", "specs", f"127.0.0.1:{fake_host}")
    assert result.returncode == 0, result.stderr
    assert "[b]x" in result.stdout and "gpu 0" in result.stdout and "?" in result.stdout
    shown = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "gpu 2 I: ?, driver None, ?% busy, in use" in shown  # a size past any float
    assert "gpu ? H: -, driver None, ?% busy" in shown


class Trickle(http.server.BaseHTTPRequestHandler):
    """A node with a valid key that answers one byte a second, or the upload with a list."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/v1/speedtest/download"):  # this much, it answers well
            size = int(self.path.rsplit("=", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(b"\0" * size)
            return
        body = json.dumps({"hostname": "x" * 200}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.5)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        while length > 0:
            length -= len(self.rfile.read(min(length, 65536)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args: object) -> None:
        pass


def test_a_peer_that_trickles_or_answers_oddly_is_cut_off_in_time(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    serve_tls(server, NodeIdentity.generate(), tmp_path / "trickle")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    peer = f"127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        result = subprocess.run([P2PRC, "specs", peer], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "P2PRC_HOME": str(tmp_path / "me"),
                                                 "P2PRC_REQUEST_TIMEOUT": "1"})
        assert result.returncode == 1 and "did not finish its answer within 1 s" in \
            result.stderr
        assert time.monotonic() - started < 10
        upload = p2prc(tmp_path / "me", "speedtest", peer, "--bytes", "10k")
        assert upload.returncode == 1 and "says it received None bytes" in upload.stderr
        assert "Traceback" not in upload.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("files, found", [
    ({"site.yml": "- import_playbook: other.yml\n",
      "other.yml": "- hosts: localhost\n" + TASK}, "other.yml: hosts: 'localhost'"),
    ({"group_vars/all.json": '{"ansible_connection": "local"}'}, "group_vars"),
    ({"group_vars/p2prc": "ansible_connection: local\n"}, "group_vars"),
    ({"v.json": '{"ansible_connection": "local"}',
      "site.yml": "- hosts: all\n  vars_files: [v.json]\n" + TASK}, "v.json: ansible_connection"),
    ({"site.yml": "- hosts: all\n  tasks:\n    - set_fact: ansible_connection=local\n"},
     "sets an ansible_ variable"),
    ({"evil.txt": "- command: id\n  delegate_to: localhost\n",
      "site.yml": "- hosts: all\n  tasks:\n    - include_tasks: evil.txt\n"},
     "evil.txt: delegate_to"),
    ({"filter_plugins/x.py": "import os\n"}, "filter_plugins/x.py: runs or configures"),
    ({"ansible.cfg": "[defaults]\n"}, "ansible.cfg: runs or configures"),
])
def test_every_way_a_bundle_reaches_this_machine_is_refused(
        tmp_path: Path, files: dict[str, str], found: str) -> None:
    path = bundle(tmp_path / "b", files.pop("site.yml", "- hosts: all\n" + TASK))
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    me = tmp_path / "me"
    assert p2prc(me, "playbooks", "add", str(path)).returncode == 0
    refused = p2prc(me, "run", "b", "--on", "abcdef123456")
    assert refused.returncode == 1 and found in refused.stderr, refused.stderr


def test_data_files_and_host_lists_of_the_group_are_fine(tmp_path: Path) -> None:
    path = bundle(tmp_path / "b", "- hosts: [all]\n" + TASK)
    (path / "templates").mkdir()
    (path / "templates" / "conf.j2").write_text("connection: local\n{% for x in y %}{% endfor %}")
    (path / "files").mkdir()
    (path / "files" / "data.yml").write_text("delegate_to: here, as data\n")
    me = tmp_path / "me"
    assert p2prc(me, "playbooks", "add", str(path)).returncode == 0
    allowed = p2prc(me, "run", "b", "--on", "abcdef123456")
    assert allowed.returncode == 1 and "no tracked container" in allowed.stderr


# -- relays, tunnels and the dial-back ------------------------------------------------------

def test_records_with_malformed_relays_are_dropped_and_odd_relays_never_dialled(
        tmp_path: Path) -> None:
    from p2prc_core.discovery import Discovery
    from p2prc_core.plugins import make_plugin_manager
    from p2prc_core.records import RecordError, verify_record

    relay_id = NodeIdentity.generate().node_id
    base = record("r", ["fd42::9"])
    fields = {k: base[k] for k in ("name", "addresses", "port", "seq", "time", "specs",
                                   "metadata", "version")}
    for relays in ("x", [1], ["1.2.3.4:8088"], [f"{relay_id}@"], ["a" * 97],
                   [f"{relay_id}@fd42::{i}" for i in range(5)]):
        with pytest.raises(RecordError):
            verify_record(sign_record(NodeIdentity.generate(), {**fields, "relays": relays}))
    with pytest.raises(RecordError):
        verify_record(sign_record(NodeIdentity.generate(), {**fields, "relay": "yes"}))
    # Well-formed, but a relay at loopback, one at a metadata address, and the node itself
    # as its own relay: kept in the record, never dialled.
    me = tmp_path / "me"
    odd = NodeIdentity.generate()
    plant(me, sign_record(odd, {**fields, "relays": [
        f"{relay_id}@127.0.0.1:8088", f"{relay_id}@169.254.169.254:80",
        f"{odd.node_id}@[fd42::5]:8088", f"{relay_id}@[fd42::6]:8088"]}))
    table = PeerTable(me, NodeIdentity.load_or_create(me).node_id)
    entry = table.load()[odd.node_id]
    hooks = make_plugin_manager()
    paths = Discovery(table, hooks, None, dict).endpoints(entry)  # type: ignore[arg-type]
    relayed = [p for p in paths if p.relay]
    assert [(p.host, p.port, p.relay) for p in relayed] == [("fd42::6", 8088, relay_id)]
    listed = p2prc(me, "peers", "ls", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["path"] == "-"


def test_hostile_relay_requests_are_clear_refusals(tmp_path: Path) -> None:
    from conftest import start_server
    from p2prc_core.client import PeerClient
    from p2prc_core.errors import PeerRefused
    from p2prc_core.models import Endpoint

    relay = start_server(tmp_path / "relay", env={"P2PRC_RELAY": "true"})
    try:
        stranger = NodeIdentity.generate()
        with PeerClient(Endpoint("127.0.0.1", relay.port, relay.node_id), timeout=5,
                        identity=stranger) as client:
            with pytest.raises(PeerRefused) as refused:  # not trusted, relay_open false
                client.relay_wait(1)
            assert refused.value.status == 403 and "trust" in str(refused.value)
            for token in ("../../etc/passwd", "0" * 31, "Z" * 32, "\x00" * 32):
                query = urlencode({"token": token})
                answer = web.post(relay.url() + "/v1/relay/accept?" + query,
                                  headers=sign_request(stranger, "POST", "/v1/relay/accept",
                                                       query, b"", relay.node_id)
                                  | {"Connection": "Upgrade",
                                     "Upgrade": "p2prc-stream/1"}, timeout=5)
                assert answer.status_code in (400, 404), (token, answer.status_code)
        for node in ("", "x" * 26, "../a", NodeIdentity.generate().node_id):
            query = urlencode({"node": node})
            answer = web.post(relay.url() + "/v1/relay/connect?" + query,
                              headers=sign_request(stranger, "POST", "/v1/relay/connect",
                                                   query, b"", relay.node_id)
                              | {"Connection": "Upgrade", "Upgrade": "p2prc-stream/1"},
                              timeout=10)
            assert answer.status_code in (400, 404), (node, answer.status_code)
            assert answer.json()["title"]
        # Without the upgrade headers: 400, nothing held open.
        query = urlencode({"node": NodeIdentity.generate().node_id})
        answer = web.post(relay.url() + "/v1/relay/connect?" + query,
                          headers=sign_request(stranger, "POST", "/v1/relay/connect", query,
                                               b"", relay.node_id), timeout=5)
        assert answer.status_code == 400 and "Upgrade" in answer.json()["description"]
        assert "Traceback" not in relay.output()
    finally:
        relay.stop()


class FakeRelay(http.server.BaseHTTPRequestHandler):
    """A 'relay' that lies: it answers 101 and then speaks first, or answers oddly."""

    mode = "speaks-first"

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        if self.mode == "speaks-first":
            self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: p2prc-stream/1\r\n\r\nHELLO I AM THE NODE")
        elif self.mode == "200":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        else:
            self.wfile.write(b"garbage\r\n\r\n")
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("mode, said", [("speaks-first", "could not have sent yet"),
                                        ("200", "HTTP 200 instead of switching"),
                                        ("garbage", "did not answer as an HTTP server")])
def test_a_lying_relay_is_refused_in_one_line(tmp_path: Path, mode: str, said: str) -> None:
    from p2prc_core.client import PeerClient
    from p2prc_core.errors import PeerError
    from p2prc_core.models import Endpoint

    liar = NodeIdentity.generate()
    handler = type("Handler", (FakeRelay,), {"mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    serve_tls(server, liar, tmp_path / "liar")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = Endpoint("127.0.0.1", server.server_address[1], NodeIdentity.generate().node_id,
                        False, liar.node_id)
        with pytest.raises(PeerError, match=said):
            with PeerClient([path], timeout=5) as client:
                client.health()
    finally:
        server.shutdown()
        server.server_close()


def test_a_hand_edited_table_entry_is_read_leniently_and_keeps_what_it_does_not_know() -> None:
    """``peers.json`` read field by field (it is read for every peer of a large table):
    each field of the wrong type is as if absent, what this version does not know is kept
    and written back, and every field this version writes reads back the same."""
    from p2prc_core.peertable import Measured, PeerEntry

    full = Measured(latency_ms=1.5, bandwidth_mbps=9.0, last_seen=3.0, failures=2,
                    address="[2001:db8::1]:8088", cursor="c1", holds_our_seq=4, hosts_us=True,
                    hosts_us_at=5.0, asked_at=6.0, rejoined=True, extra={"future": [1]})
    assert Measured.from_json(full.to_json()) == full
    odd = Measured.from_json({"latency_ms": "fast", "bandwidth_mbps": True, "failures": 1.5,
                              "address": 7, "cursor": None, "hosts_us": "yes",
                              "rejoined": 1, "asked_at": [], "new": {"x": 1}})
    assert odd == Measured(extra={"new": {"x": 1}})
    assert Measured.from_json(["not", "an", "object"]) == Measured()
    entry = PeerEntry.from_json({"record": {"node_id": "n"}, "changed": "1", "measured": 3,
                                 "local_name": 5, "kept": True})
    assert (entry.changed, entry.measured, entry.local_name) == (0, Measured(), None)
    assert entry.to_json()["kept"] is True
