"""Who will host me (issue 22): a host says, in its answer to a signed table exchange,
whether it would start a container for the caller; ``peers ls``, ``Node.peers(can_host=)``
and the best-peer order show it. And stopping ``peers update`` with Ctrl-C: at once, saying
what was kept, the table whole; its bar never shows ``0/None``."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from conftest import P2PRC, LiveServer, start_server, web
from p2prc_core.asking import parse_answer
from p2prc_core.errors import PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import Measured, PeerTable, TableState
from p2prc_core.records import sign_record
from p2prc_core.signing import sign_request


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          env=_env(home))


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "P2PRC_HOME": str(home), "P2PRC_ALLOW_LOOPBACK": "true",
            "P2PRC_ADVERTISE_ADDRESSES": "127.0.0.1"}


def listed(home: Path) -> dict[str, dict[str, object]]:
    ls = cli(home, "peers", "ls", "--json")
    assert ls.returncode == 0, ls.stderr
    return {row["node_id"]: row for row in json.loads(ls.stdout)}


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two real servers: the first trusts ``tmp_path / "me"``, the second does not."""
    me = NodeIdentity.load_or_create(tmp_path / "me").node_id
    friendly, stranger = (start_server(tmp_path / n) for n in ("friendly", "stranger"))
    try:
        assert cli(friendly.home, "trust", me, "--name", "me").returncode == 0
        yield friendly, stranger
    finally:
        friendly.stop()
        stranger.stop()


@pytest.mark.integration
def test_peers_ls_and_the_api_tell_who_will_host_me(tmp_path: Path,
                                                    two_hosts: tuple[LiveServer, LiveServer]
                                                    ) -> None:
    import p2prc

    friendly, stranger = two_hosts
    me = tmp_path / "me"
    for host in two_hosts:
        assert cli(me, "peers", "add", host.peer()).returncode == 0
    update = cli(me, "peers", "update", "--hops", "1")
    assert update.returncode == 0, update.stderr
    rows = listed(me)
    assert rows[friendly.node_id]["can_host"] is True
    assert rows[stranger.node_id]["can_host"] is False
    assert isinstance(rows[friendly.node_id]["can_host_at"], float)
    table = cli(me, "peers", "ls")
    assert "hosts you" in table.stdout
    node = p2prc.Node.open(me)
    assert [p.node_id for p in node.peers(can_host=True)] == [friendly.node_id]
    assert [p.node_id for p in node.peers(can_host=False)] == [stranger.node_id]

    # The best peer is one that will host us, even when another measures better.
    def stranger_measures_best(state: TableState) -> None:
        state.peers[stranger.node_id].measured.latency_ms = 0.01
        state.peers[friendly.node_id].measured.latency_ms = 50.0

    PeerTable(me).update(stranger_measures_best)
    assert node.peers()[0].node_id == friendly.node_id
    assert next(iter(listed(me))) == friendly.node_id  # 'peers ls' lists it first

    # A host that stops trusting us says no in its answer to our container request (403):
    # that is kept, as the next update's answer would say.
    assert cli(friendly.home, "untrust", node.node_id).returncode == 0
    touched = cli(me, "touch", friendly.node_id)
    assert touched.returncode != 0 and "403" in touched.stderr, touched.stderr
    assert listed(me)[friendly.node_id]["can_host"] is False


@pytest.mark.integration
def test_an_unsigned_exchange_is_told_nothing_of_hosting(tmp_path: Path,
                                                         two_hosts: tuple[LiveServer,
                                                                          LiveServer]) -> None:
    """Whom a host would host is said only to that node (it signs its exchange): nobody
    learns from an unsigned question whether a host trusts some node."""
    friendly, _ = two_hosts
    me = NodeIdentity.load_or_create(tmp_path / "me").node_id
    answer = web.post(friendly.url() + "/v1/peers", json={"from": me, "records": []})
    assert answer.status_code == 200 and "hosts_you" not in answer.json()


def test_what_a_peer_says_of_hosting_is_checked_for_type() -> None:
    base = b'{"records": [], "cursor": "e:1"'
    assert parse_answer(base + b', "hosts_you": true}', 10, "p").hosts_you is True
    assert parse_answer(base + b"}", 10, "p").hosts_you is None
    for hostile in (b'"yes"', b"1", b"{}", b"[true]"):
        with pytest.raises(PeerRefused, match="hosts_you"):
            parse_answer(base + b', "hosts_you": ' + hostile + b"}", 10, "p")
    # And what a table file holds (edited by hand, or written by another version).
    assert Measured.from_json({"hosts_us": "yes", "hosts_us_at": "now"}).hosts_us is None
    kept = Measured.from_json({"hosts_us": False, "hosts_us_at": 5})
    assert (kept.hosts_us, kept.hosts_us_at) == (False, 5.0)


def test_the_update_bar_never_shows_none() -> None:
    from p2prc_core.cli.peers import update_bar

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with update_bar(console) as bar:  # as 'peers update' starts it, before any count
        bar.add_task("update", total=None, hop=1, count="")
        bar.refresh()
    assert "hop 1" in out.getvalue() and "None" not in out.getvalue()


class Lines:
    """A process's stderr, read as it comes, for a test to wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.parts: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read(1):
            with self.changed:
                self.parts.append(chunk)
                self.changed.notify_all()
        with self.changed:
            self.parts.append("")
            self.changed.notify_all()

    def text(self, settle: float = 5.0) -> str:
        """What came so far, after waiting up to ``settle`` seconds for the end."""
        self.reader.join(timeout=settle)
        with self.changed:
            return "".join(self.parts)

    def wait_for(self, wanted: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: wanted in "".join(self.parts), timeout)


class SilentPeer:
    """A socket that accepts connections and never says a word: a peer too slow to answer
    within the update's budget."""

    def __init__(self, home: Path):
        self.identity = NodeIdentity.load_or_create(home)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted.set()

    def record(self) -> dict[str, object]:
        return sign_record(self.identity, {
            "name": "silent", "addresses": ["127.0.0.1"], "port": self.port, "seq": 1,
            "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.mark.integration
def test_ctrl_c_stops_an_update_at_once_and_says_what_was_kept(tmp_path: Path) -> None:
    me = tmp_path / "me"
    answering = start_server(tmp_path / "answering")
    silent = SilentPeer(tmp_path / "silent")
    try:
        assert cli(me, "peers", "add", answering.peer()).returncode == 0
        PeerTable(me, allow_loopback=True).merge([silent.record()])
        # The bar is drawn (as on a terminal), so the test can wait for its line.
        update = subprocess.Popen([P2PRC, "peers", "update", "--hops", "1"], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**_env(me), "P2PRC_PEER_TIME_BUDGET": "30",
                                       "P2PRC_REQUEST_TIMEOUT": "30", "TTY_COMPATIBLE": "1",
                                       "COLUMNS": "120"})
        err = Lines(update)
        assert silent.accepted.wait(30), "the update never dialled the silent peer"
        assert err.wait_for("/2 peers", 30), err.text(0)  # under way
        answered = err.wait_for("1/2 peers", 10)  # the answering peer, too, has answered
        asked = time.monotonic()
        update.send_signal(signal.SIGINT)
        update.wait(timeout=30)
        took = time.monotonic() - asked
    finally:
        silent.close()
        answering.stop()
    shown = err.text()
    # At once, next to the 30 s the silent peer could hold it (a loaded CI machine needs a
    # few seconds to save the table and end the process).
    assert took < 5.0, f"Ctrl-C took {took:.1f} s: {shown}"
    assert update.returncode == 130 and answered, shown
    assert "stopped: 1 peer(s) answered" in shown and "saved" in shown, shown
    assert "Aborted!" not in shown and "None" not in shown, shown
    state = json.loads((me / "peers.json").read_text())  # whole, and still holds both
    assert set(state["peers"]) == {answering.node_id, silent.identity.node_id}


def test_a_second_ctrl_c_ends_the_process() -> None:
    """After the first Ctrl-C, SIGINT is the system's own again (a second ends the process
    at once, the table being written atomically); afterwards as it was."""
    from p2prc_core.cli.peers import _second_interrupt_ends

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _second_interrupt_ends():
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == before


def test_a_signature_for_another_host_or_a_replay_is_told_nothing_of_hosting(
        tmp_path: Path, two_hosts: tuple[LiveServer, LiveServer]) -> None:
    """The friendly host trusts us. A signed exchange made for the other host, and one sent
    a second time, are answered (200), without ``hosts_you``: only a fresh signature made for
    this very host learns it."""
    friendly, other = two_hosts
    me = NodeIdentity.load_or_create(tmp_path / "me")
    body = json.dumps({"from": me.node_id, "records": []}).encode()

    def post(headers: dict[str, str]) -> dict[str, object]:
        answer = web.post(friendly.url() + "/v1/peers", content=body,
                          headers={"Content-Type": "application/json", **headers})
        assert answer.status_code == 200, answer.text
        found: dict[str, object] = answer.json()
        return found

    elsewhere = sign_request(me, "POST", "/v1/peers", "", body, other.node_id)
    assert "hosts_you" not in post(elsewhere)
    fresh = sign_request(me, "POST", "/v1/peers", "", body, friendly.node_id)
    assert post(fresh)["hosts_you"] is True
    assert "hosts_you" not in post(fresh)  # the same nonce again
