"""TLS bound to node identity, tried as an attacker would: a man in the middle that
terminates TLS with its own key, a relay that only forwards, a request replayed to another
host, a key that changes at a pinned address, and a capture on the wire."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import P2PRC, LiveServer, free_port, require, start_server, web
from p2prc_core import tls
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.records import verify_record
from p2prc_core.signing import sign_request
from p2prc_core.trust import TrustStore

pytestmark = pytest.mark.integration


def p2prc(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "P2PRC_HOME": str(home), **env})


class Proxy:
    """Listens on loopback and forwards each connection to ``target``. With an ``identity``
    it is a man in the middle: it terminates TLS with that node's key (what anyone on the
    path can do) and opens its own TLS connection onwards; without, it only relays bytes.
    It counts what clients sent it after the handshake."""

    def __init__(self, target_port: int, identity: NodeIdentity | None, home: Path,
                 port: int = 0, timeout: float | None = 10):
        self.target_port = target_port
        self.timeout = timeout  # None: a link that may idle (a relay's long poll)
        self.context = None
        if identity is not None:
            home.mkdir(parents=True, exist_ok=True)
            from cryptography.hazmat.primitives import serialization

            (home / "node.key").write_bytes(identity.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            self.context = tls.server_context(*tls.server_files(home, identity))
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.peer = f"127.0.0.1:{self.port}"
        self.handshakes = 0
        self.connections = 0
        self.request_bytes = 0
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(self.timeout)
            if self.context is not None:
                client = self.context.wrap_socket(client, server_side=True)
                with self._lock:
                    self.handshakes += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port),
                                                timeout=self.timeout)
            if self.context is not None:
                upstream = tls.client_context().wrap_socket(upstream)
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()
            self._pump(client, upstream, True)
        except (OSError, ssl.SSLError):
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if from_client:
                        self.request_bytes += len(data)
                    self.seen += data
                sink.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        except OSError:
            pass
        self.listener.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[LiveServer]:
    """A real server that trusts the node whose home is tmp_path/'me', and tells peers that
    it is at a port where a proxy will sit (a port forward an attacker controls)."""
    me = NodeIdentity.load_or_create(tmp_path / "me")
    home = tmp_path / "host"
    home.mkdir()
    TrustStore(home).add(me.node_id, "me")
    proxy_port = free_port()
    server = start_server(home, env={"P2PRC_ADVERTISE_ADDRESSES": "127.0.0.1",
                                     "P2PRC_ADVERTISE_PORT": str(proxy_port),
                                     "P2PRC_NAME": "the-real-host"})
    server.proxy_port = proxy_port  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def test_a_man_in_the_middle_gets_no_request_from_any_command(tmp_path: Path,
                                                              host: LiveServer) -> None:
    mallory = NodeIdentity.generate()
    # On the port the host advertises: whoever dials the host reaches Mallory.
    proxy = Proxy(host.port, mallory, tmp_path / "mallory",
                  port=host.proxy_port)  # type: ignore[attr-defined]
    me = tmp_path / "me"
    real = verify_record(web.get(host.url() + "/v1/node", timeout=5).json())
    assert real["port"] == host.proxy_port  # everyone is told to dial the proxy
    PeerTable(me, NodeIdentity.load_or_create(me).node_id, allow_loopback=True).merge([real])
    token = p2prc(host.home, "invite", "--address", "127.0.0.1", "--port",
                  str(host.proxy_port)).stdout.strip()
    node = host.node_id
    expected = f"presented node {mallory.node_id}, not {node}"
    commands = [("specs", node), ("speedtest", node, "--bytes", "1M"),
                ("touch", node, "--ports", "1"), ("peers", "add", f"{node}@{proxy.peer}"),
                ("specs", f"{node}@{proxy.peer}"), ("join", token)]
    try:
        for command in commands:
            result = p2prc(me, *command, P2PRC_ALLOW_LOOPBACK="true")
            assert result.returncode == 1, (command, result.stdout)
            assert expected in result.stderr or \
                f"({mallory.node_id} instead of {node})" in result.stderr, \
                (command, result.stderr)
            assert "Traceback" not in result.stderr
        update = p2prc(me, "peers", "update", "--json", P2PRC_ALLOW_LOOPBACK="true")
        assert expected in json.loads(update.stdout)["failed"][node]
        # Every command reached the man in the middle, and none sent it a byte of a request.
        assert proxy.handshakes >= len(commands) + 1
        assert proxy.request_bytes == 0
        # The reply-rewriting attack has nothing to work on: no container was taken as ours.
        assert not (me / "containers.json").exists() or \
            json.loads((me / "containers.json").read_text()) == {}
        assert TrustStore(host.home).is_trusted(NodeIdentity.load_or_create(me).node_id)
    finally:
        proxy.close()


def test_a_relay_that_only_forwards_works_and_sees_only_ciphertext(tmp_path: Path,
                                                                   host: LiveServer) -> None:
    relay = Proxy(host.port, None, tmp_path / "relay")
    try:
        result = p2prc(tmp_path / "me", "specs", f"{host.node_id}@127.0.0.1:{relay.port}",
                       "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["hostname"]
        assert relay.request_bytes > 0 and b"/v1/specs" not in relay.seen
        assert b"hostname" not in relay.seen and b"the-real-host" not in relay.seen
    finally:
        relay.close()


def test_an_exchange_pays_one_handshake(tmp_path: Path, host: LiveServer) -> None:
    """The exchange's pages and the latency probes share one connection."""
    relay = Proxy(host.port, None, tmp_path / "relay",
                  port=host.proxy_port)  # type: ignore[attr-defined]
    me = tmp_path / "me"
    try:
        real = verify_record(web.get(host.url() + "/v1/node", timeout=5).json())
        PeerTable(me, NodeIdentity.load_or_create(me).node_id,
                  allow_loopback=True).merge([real])
        update = p2prc(me, "peers", "update", "--hops", "1", "--json",
                       P2PRC_ALLOW_LOOPBACK="true", P2PRC_LATENCY_PROBES="3")
        assert update.returncode == 0 and json.loads(update.stdout)["failed"] == {}
        assert relay.connections == 1
    finally:
        relay.close()


def test_a_request_signed_for_one_host_is_refused_by_another(tmp_path: Path) -> None:
    caller = NodeIdentity.generate()
    none = {"P2PRC_BACKEND": "none"}  # a request that gets through starts nothing
    first = start_server(tmp_path / "a", env=none)
    second = start_server(tmp_path / "b", env=none)
    try:
        for server in (first, second):
            TrustStore(server.home).add(caller.node_id, "caller")
        body = json.dumps({"ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me"}).encode()
        headers = {**sign_request(caller, "POST", "/v1/containers", "", body,
                                  first.node_id), "Content-Type": "application/json"}
        replayed = web.post(second.url() + "/v1/containers", content=body, headers=headers,
                            timeout=5)
        assert replayed.status_code == 401
        assert replayed.json()["title"] == "Signed for another node"
        assert first.node_id in replayed.json()["description"]
        # The same signature is good where it was meant to go: 503 (no backend) after the
        # signature and trust checks passed.
        meant = web.post(first.url() + "/v1/containers", content=body, headers=headers,
                         timeout=5)
        assert meant.status_code == 503, meant.json()
    finally:
        first.stop()
        second.stop()


def test_a_changed_key_at_a_pinned_address_is_refused(tmp_path: Path) -> None:
    me = tmp_path / "me"
    first = start_server(tmp_path / "first")
    port = first.port
    try:
        contact = p2prc(me, "specs", first.peer())
        assert contact.returncode == 0, contact.stderr
        assert f"first contact with {first.peer()}: node {first.node_id}" in contact.stderr
        again = p2prc(me, "specs", first.peer())
        assert again.returncode == 0 and "first contact" not in again.stderr
    finally:
        first.stop()
    second = start_server(tmp_path / "second", port=port)  # another node, the same address
    try:
        refused = p2prc(me, "specs", second.peer())
        assert refused.returncode == 1
        assert f"presented node {second.node_id}, not {first.node_id}" in refused.stderr
        assert f"p2prc peers rm {first.node_id}" in refused.stderr
        wrong = p2prc(me, "specs", f"{first.node_id}@{second.peer()}")
        assert wrong.returncode == 1 and "presented node" in wrong.stderr
        named = p2prc(me, "specs", f"{second.node_id}@{second.peer()}")  # the user accepts it
        assert named.returncode == 0, named.stderr
        assert p2prc(me, "specs", second.peer()).returncode == 0  # now pinned to the new one
        assert p2prc(me, "peers", "rm", second.node_id).returncode == 0
        fresh = p2prc(me, "specs", second.peer())  # a stranger again: trusted on first use
        assert fresh.returncode == 0 and "first contact" in fresh.stderr
    finally:
        second.stop()


def test_peers_add_pins_and_refuses_a_record_of_another_node(tmp_path: Path,
                                                            live_server: LiveServer) -> None:
    me = tmp_path / "me"
    added = p2prc(me, "peers", "add", live_server.peer(), "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["node_id"] == live_server.node_id
    state = PeerTable(me).snapshot()
    assert state.pins[live_server.peer()] == live_server.node_id
    rm = p2prc(me, "peers", "rm", live_server.node_id)
    assert rm.returncode == 0 and live_server.node_id in rm.stdout
    assert PeerTable(me).snapshot().pins == {} and PeerTable(me).load() == {}
    missing = p2prc(me, "peers", "rm", live_server.node_id)
    assert missing.returncode == 1 and "no peer" in missing.stderr


def test_id_prints_the_certificate_fingerprint_its_server_presents(
        tmp_path: Path, live_server: LiveServer) -> None:
    shown = json.loads(p2prc(live_server.home, "id", "--json").stdout)
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as raw:
        with tls.client_context().wrap_socket(raw) as wrapped:
            der = wrapped.getpeercert(True)
            assert wrapped.version() == "TLSv1.3"
    import hashlib

    assert shown["certificate_fingerprint"] == "SHA256:" + hashlib.sha256(der).hexdigest()
    assert shown["node_id"] == live_server.node_id


def test_plain_http_is_for_labs_and_says_so(tmp_path: Path) -> None:
    server = start_server(tmp_path / "lab", env={"P2PRC_TRANSPORT": "http"})
    try:
        assert "WARNING: transport = http" in server.output()
        result = p2prc(tmp_path / "me", "specs", server.peer(), "--json",
                       P2PRC_TRANSPORT="http")
        assert result.returncode == 0, result.stderr
        over_tls = p2prc(tmp_path / "me", "specs", server.peer())
        assert over_tls.returncode == 1 and "did not complete a TLS handshake" in \
            over_tls.stderr
    finally:
        server.stop()


@pytest.mark.netns
def test_a_capture_on_the_wire_shows_no_plaintext(tmp_path: Path) -> None:
    """A raw capture on the veth of a friend in another namespace, while it adds the host,
    exchanges tables, runs a speed test and asks for a container."""
    from netlab import NetLab, available

    reason = available()
    require(reason is None, reason or "")
    lab = NetLab(tmp_path / "lab")
    try:
        friend = lab.add_host("friend")
        friend_id = NodeIdentity.load_or_create(friend.home).node_id
        home = tmp_path / "host"
        home.mkdir()
        TrustStore(home).add(friend_id, "friend")
        # No backend: the container request is sent whole and answered 503, and nothing is
        # left running.
        server = start_server(home, env={"P2PRC_ADVERTISE_ADDRESSES": f"{lab.v4_prefix}.1",
                                         "P2PRC_NAME": "host-plaintext-marker",
                                         "P2PRC_BACKEND": "none"})
        capture = Capture(f"p2p{lab.tag[:4]}2")  # the friend's veth, on the bridge side
        try:
            peer = f"{lab.v4_prefix}.1:{server.port}"
            env = {"P2PRC_NAME": "friend-plaintext-marker"}
            added = friend.p2prc("peers", "add", peer, **env)
            assert added.returncode == 0, added.stderr
            assert friend.p2prc("peers", "update", **env).returncode == 0
            assert friend.p2prc("speedtest", peer, "--bytes", "1M", **env).returncode == 0
            touched = friend.p2prc("touch", peer, **env)
            public_key = (friend.home / "ssh" / "id_ed25519.pub").read_text().split()[1]
        finally:
            seen = capture.stop()
            server.stop()
        assert len(seen) > 100_000, "the capture saw the traffic"  # the 1 MB speed test
        assert b"\x16\x03\x01" in seen  # TLS handshakes, and nothing readable:
        for plaintext in (b"friend-plaintext-marker", b"host-plaintext-marker",
                          public_key.encode(), b"ssh_key", b"/v1/", b"HTTP/1.1",
                          b'"records"'):
            assert plaintext not in seen, plaintext
        assert touched.returncode == 1 and "No backend" in touched.stderr
    finally:
        lab.close()


class Capture:
    """Every frame on one interface, read with a raw packet socket until ``stop``."""

    def __init__(self, interface: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.frames = bytearray()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                self.frames += self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> bytes:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        return bytes(self.frames)


def test_a_pin_holds_however_the_address_is_written_and_whoever_is_asked(
        tmp_path: Path) -> None:
    me = tmp_path / "me"
    first = start_server(tmp_path / "first")
    port = first.port
    try:
        assert p2prc(me, "peers", "add", first.peer()).returncode == 0  # pinned there
    finally:
        first.stop()
    # Another node at the same address, and in the user's table with a record that claims
    # that address: asking it by id must not move the first node's pin.
    mallory = start_server(tmp_path / "mallory", port=port)
    try:
        record = verify_record(web.get(mallory.url() + "/v1/node", timeout=5).json())
        PeerTable(me, NodeIdentity.load_or_create(me).node_id,
                  allow_loopback=True).merge([record])
        asked = p2prc(me, "specs", mallory.node_id, P2PRC_ALLOW_LOOPBACK="true")
        assert asked.returncode == 0 and "pinned" not in asked.stderr
        for spelling in (f"127.0.0.1:{port}", f"[::ffff:127.0.0.1]:{port}",
                         f"[::FFFF:7f00:1]:{port}", f"localhost:{port}"):
            refused = p2prc(me, "specs", spelling)
            assert refused.returncode == 1, (spelling, refused.stdout)
            assert f"presented node {mallory.node_id}, not {first.node_id}" in \
                refused.stderr, spelling
        for other in (f"127.1:{port}", f"2130706433:{port}", f"127.0.0.01:{port}"):
            odd = p2prc(me, "specs", other)
            assert odd.returncode == 2 and "four numbers" in odd.stderr, other
    finally:
        mallory.stop()


def test_a_peers_chosen_name_never_stands_for_an_address(tmp_path: Path,
                                                        live_server: LiveServer) -> None:
    me = tmp_path / "me"
    target = f"{live_server.node_id}@{live_server.peer()}"
    liar = start_server(tmp_path / "liar", env={"P2PRC_NAME": target})
    try:
        assert p2prc(me, "peers", "add", liar.peer()).returncode == 0
        result = p2prc(me, "specs", target, "--json")
        assert result.returncode == 0, result.stderr
        node = json.loads(p2prc(live_server.home, "id", "--json").stdout)
        assert node["node_id"] == live_server.node_id
        assert "GET /v1/specs" not in liar.output()  # the liar was not asked
    finally:
        liar.stop()


def stall_in_the_handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x16")  # the first byte of a ClientHello, then silence
    return sock


def stall_on_a_kept_alive_connection(port: int) -> socket.socket:
    sock = tls.client_context().wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10))
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # kept alive: gthread resets it
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHo")  # then half a request, and silence
    return sock


@pytest.mark.parametrize("stall", [stall_in_the_handshake, stall_on_a_kept_alive_connection])
def test_a_stalled_connection_does_not_hold_a_server(tmp_path: Path, stall: Any) -> None:
    server = start_server(tmp_path / "host", env={"P2PRC_THREADS": "3",
                                                  "P2PRC_REQUEST_TIMEOUT": "1"})
    stalled = []
    try:
        for _ in range(6):  # more than the server has threads (3)
            stalled.append(stall(server.port))
        # They are dropped after the connection timeout (3 x request_timeout), and then the
        # server answers again.
        assert web.get(server.url() + "/v1/health", timeout=30).status_code == 200
    finally:
        for sock in stalled:
            sock.close()
        server.stop()
