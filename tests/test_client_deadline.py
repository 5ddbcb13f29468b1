"""A peer that drips its answer (a byte every so often, each in its own TLS record) is cut
off when the request's time is up: every request to a peer has one absolute deadline, head
included, and an update spends at most its budget on one peer."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import LiveServer
from p2prc_core.cli import main
from p2prc_core.client import PeerClient
from p2prc_core.config import Settings
from p2prc_core.errors import PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import parse_endpoint
from p2prc_core.plugins import PluginHooks
from p2prc_core.records import sign_record
from p2prc_core.services import NodeServices
from p2prc_core.tls import server_context, server_files

pytestmark = pytest.mark.integration

TIMEOUT = 2.0  # request_timeout in these tests
MARGIN = 2.5  # for a loaded machine; a dripping answer would take DRIP_FOR without the fix
DRIP_FOR = 20.0  # the most a dripping peer drips on one connection before it hangs up
BODY = b'{"hostname": "' + b"x" * 400 + b'"}'


class DrippingPeer:
    """A node with a real key and certificate (TLS 1.3) that answers every request with
    ``HTTP/1.1 200 OK`` and then one byte every ``every`` seconds, each byte sent in its own
    TLS record: of a head that never ends (``part="head"``), or, after a complete head, of
    its JSON body (``part="body"``)."""

    def __init__(self, home: Path, part: str, every: float = 0.3):
        self.identity = NodeIdentity.load_or_create(home)
        self.context = server_context(*server_files(home, self.identity))
        self.part, self.every = part, every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.port}"

    def record(self) -> dict[str, object]:
        return sign_record(self.identity, {
            "name": "dripper", "addresses": ["127.0.0.1"], "port": self.port, "seq": 1,
            "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                self._read_request(conn)
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                if self.part == "head":
                    self._drip(conn, b"X-Drip: " + b"a" * 10_000)
                else:
                    conn.sendall(b"Content-Type: application/json\r\nContent-Length: "
                                 + str(len(BODY)).encode() + b"\r\n\r\n")
                    self._drip(conn, BODY)
        except (OSError, ssl.SSLError):
            pass  # the client hung up: what the tests want

    def _read_request(self, conn: ssl.SSLSocket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            block = conn.recv(65536)
            if not block:
                raise ConnectionResetError
            data += block
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += conn.recv(65536)

    def _drip(self, conn: ssl.SSLSocket, data: bytes) -> None:
        ends = time.monotonic() + DRIP_FOR
        for byte in data:
            if self.stopping.wait(self.every) or time.monotonic() > ends:
                return
            conn.sendall(bytes([byte]))  # one TLS record per byte

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture(params=["head", "body"])
def dripper(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DrippingPeer]:
    peer = DrippingPeer(tmp_path / "dripper", request.param)
    try:
        yield peer
    finally:
        peer.stop()


def test_a_client_request_ends_in_time_with_a_clear_error(dripper: DrippingPeer) -> None:
    started = time.monotonic()
    with PeerClient(parse_endpoint(dripper.peer), timeout=TIMEOUT) as client, \
            pytest.raises(PeerError) as failed:
        client.specs()
    took = time.monotonic() - started
    assert took < TIMEOUT + MARGIN, took
    assert f"{dripper.peer} did not finish its answer within 2 s (it sent it too slowly)" \
        in str(failed.value)
    assert "\n" not in str(failed.value)


@pytest.mark.parametrize("command", [["specs"], ["peers", "add"]])
def test_the_command_line_says_so_in_one_line_in_time(dripper: DrippingPeer, home: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      command: list[str]) -> None:
    monkeypatch.setenv("P2PRC_REQUEST_TIMEOUT", str(TIMEOUT))
    started = time.monotonic()
    result = CliRunner().invoke(main, [*command, dripper.peer], catch_exceptions=False)
    took = time.monotonic() - started
    assert took < TIMEOUT + MARGIN, took
    assert result.exit_code == 1 and result.stdout == ""
    # stderr: the first-contact notice (its key is pinned), then the error in one line
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [line for line in result.stderr.splitlines()
                      if "did not finish" in line or "Error" in line]
    assert len(errors) == 1 and f"Error: {dripper.peer} did not finish its answer within " \
        f"2 s (it sent it too slowly): " in errors[0], result.stderr


def test_an_update_spends_its_budget_on_a_dripping_peer_and_still_updates_the_others(
        dripper: DrippingPeer, live_server: LiveServer, tmp_path: Path,
        hooks: PluginHooks) -> None:
    """The budget (3 s) binds before request_timeout (10 s): the update ends in about the
    budget, counts the dripping peer as failed and records the good one."""
    services = NodeServices(Settings(allow_loopback=True, peer_time_budget=3.0,
                                     request_timeout=10.0), tmp_path / "me", hooks)
    services.peers.add(live_server.peer())
    services.table.merge([dripper.record()])
    started = time.monotonic()
    summary = services.peers.update(hops=1)
    took = time.monotonic() - started
    assert took < 3.0 + MARGIN, took
    assert "did not finish its answer within 3 s (it sent it too slowly)" in \
        summary.failed[dripper.identity.node_id]
    assert live_server.node_id not in summary.failed
    good = services.peers.entries()[live_server.node_id]
    seen = good.measured.last_seen
    assert good.measured.failures == 0 and seen is not None and seen >= int(started) - 1


def test_a_speed_test_head_is_bounded_as_a_whole(dripper: DrippingPeer) -> None:
    """The speed test's own socket path: its head within the timeout, not per read."""
    started = time.monotonic()
    with PeerClient(parse_endpoint(dripper.peer), timeout=TIMEOUT) as client, \
            pytest.raises(PeerError):
        client.download(1 << 20)
    assert time.monotonic() - started < TIMEOUT + MARGIN


def test_a_tunnels_upgrade_answer_is_bounded_as_a_whole(dripper: DrippingPeer) -> None:
    """ssh, forward and run open a tunnel with an upgrade: a peer that drips its answer to
    it is given up on within the timeout."""
    import asyncio

    from p2prc_core.tls import client_context
    from p2prc_core.upgrade_client import upgrade_async

    async def attempt() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", dripper.port,
                                                       ssl=client_context(),
                                                       server_hostname="")
        try:
            return await upgrade_async(reader, writer, dripper.peer, "/v1/containers/x/tunnel",
                                       dripper.peer, {}, TIMEOUT)
        finally:
            writer.close()

    started = time.monotonic()
    with pytest.raises(PeerError, match="did not finish its answer within 2 s"):
        asyncio.run(attempt())
    assert time.monotonic() - started < TIMEOUT + MARGIN


def test_a_wait_in_an_error_line_is_said_to_a_tenth_of_a_second() -> None:
    """What is left of a deadline is rarely round: '4.98379 s' reads as noise."""
    from p2prc_core.errors import unreachable

    assert str(unreachable("peer", TimeoutError(), 4.98379)) == "peer did not answer within 5 s"
    assert str(unreachable("peer", TimeoutError(), 0.5)) == "peer did not answer within 0.5 s"


def test_only_a_refused_connection_asks_whether_the_server_runs() -> None:
    """'Network is unreachable' is the path's fault: no hint that the server may be down."""
    import errno
    import os

    from p2prc_core.errors import unreachable

    refused = unreachable("peer", ConnectionRefusedError(errno.ECONNREFUSED,
                                                         os.strerror(errno.ECONNREFUSED)), 5)
    assert str(refused).endswith("(is 'p2prc server' running there?)")
    no_route = unreachable("peer", OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH)), 5)
    assert str(no_route) == "cannot reach peer: Network is unreachable"
