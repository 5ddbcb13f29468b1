"""Fault suite: the clock of one node jumps an hour forward, then back (or an hour behind).

Real processes run under libfaketime: each reads its offset from a file at every call, so a
running server's clock jumps when the test rewrites the file, as a machine's does when its
clock is set; monotonic time stays true, as it does then. What is documented (docs/security.md,
docs/api.md) and checked here:

- signed requests: refused (401) outside ``clock_window_seconds`` of the server's clock, with
  a message that names the clocks (on both sides: the host's words, and the client's own
  measure from the answer's ``Date``), never "bad signature"; nothing is spent (an invite
  refused so still works once the clock is right);
- signed records: dropped when dated more than ``MAX_FUTURE_SECONDS`` ahead of the reader's
  clock (with a message that names the clock); a node whose clock went back signs its record
  again, so peers take it at once, not an hour later;
- leases: wall-clock times (they outlive restarts): a jump forward ends the leases with less
  than the jump left, at the reaper's next pass, each with a log line; longer ones run on;
- the reaper keeps running after the clock goes back (it waited for the clock to catch up);
- pins have no time in them; the newcomers limit counts per minute of the host's clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from faultkit import wait_for

from conftest import P2PRC, LiveServer, require, start_server, web
from p2prc_core.client import PeerClient
from p2prc_core.errors import clocks_apart
from p2prc_core.identity import NodeIdentity
from p2prc_core.intake import IntakeLimit
from p2prc_core.models import parse_endpoint
from p2prc_core.peertable import PeerTable
from p2prc_core.periodic import Periodic
from p2prc_core.records import RecordError, RecordPublisher, sign_record, verify_record
from p2prc_core.signing import SignatureError, check_signature, sign_request
from p2prc_core.trust import ServerState, TrustStore

HOUR = 3600
# libfaketime 0.9.10 (Debian 12) fails Python's time.sleep with EINVAL when monotonic time is
# left true (its clock_nanosleep wrapper), and hangs timed waits when it is faked: so the
# processes under it keep true monotonic time and sleep through select() instead.
SLEEP_SHIM = '''"""time.sleep through select(): libfaketime breaks clock_nanosleep (tests only)."""
import select
import time


def _sleep(seconds, _select=select.select):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    _select([], [], [], seconds)


time.sleep = _sleep
'''




@dataclass
class Clock:
    """One node's wall clock: every process started with ``env`` reads ``offset_file`` at
    each call (FAKETIME_NO_CACHE), so writing it makes the running node's clock jump."""

    offset_file: Path
    env: dict[str, str]

    def set(self, offset: str) -> None:
        """``+1h``, ``-1h``, ``+0``: written whole at once (a reader never sees half)."""
        new = self.offset_file.with_suffix(".new")
        new.write_text(offset + "\n")
        os.replace(new, self.offset_file)

    def run(self, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``p2prc ARGS`` for ``home``, on this clock."""
        return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "P2PRC_HOME": str(home), **self.env})


@pytest.fixture(scope="session")
def preload() -> str:
    """libfaketime's multi-threaded library, as the faketime command names it."""
    require(shutil.which("faketime") is not None,
            "faketime is missing: apt-get install faketime (scripts/docker-engine does)")
    found = subprocess.run(["faketime", "-m", "-f", "+0", "sh", "-c", 'printf %s "$LD_PRELOAD"'],
                           capture_output=True, text=True, timeout=30).stdout
    require("faketime" in found, f"faketime names no library to preload ({found!r})")
    return found


@pytest.fixture
def clock(tmp_path: Path, preload: str) -> Clock:
    shim = tmp_path / "faketime-shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
    found = Clock(tmp_path / "faketime.rc", {
        "LD_PRELOAD": preload, "FAKETIME_TIMESTAMP_FILE": str(tmp_path / "faketime.rc"),
        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])})
    found.set("+1h")
    probe = subprocess.run(  # the offset is taken, monotonic time is not moved, sleep works
        [sys.executable, "-c", "import time; t, m = time.time(), time.monotonic(); "
         "time.sleep(0.01); print(t, m)"], capture_output=True, text=True, timeout=30,
        env={**os.environ, **found.env})
    wall, monotonic = (float(x) for x in probe.stdout.split() or ["0", "0"])
    require(probe.returncode == 0 and abs(wall - time.time() - HOUR) < 60
            and abs(monotonic - time.monotonic()) < 60,
            f"libfaketime does not move this Python's clock as expected: {probe.stderr[-300:]}")
    found.set("+0")
    return found


def p2prc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``p2prc ARGS`` for ``home``, on the true clock."""
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "P2PRC_HOME": str(home)})


def invite(run: Callable[..., subprocess.CompletedProcess[str]], host: LiveServer) -> str:
    """A one-time invite made on the host (``run``: p2prc on the host's clock)."""
    made = run(host.home, "invite", "--port", str(host.port), "--address", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def unused_invites(host: LiveServer) -> int:
    return sum(1 for i in ServerState(host.home).invites() if i["used_by"] is None)


def names_the_clocks(result: subprocess.CompletedProcess[str], ahead: str) -> None:
    """Refused with one line that says the clocks are an hour apart (``ahead``: which way,
    as this node's clock stands to the peer's), never as a bad signature."""
    assert result.returncode == 1, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert f"this node's clock is 1 h {ahead} the peer's" in line, line
    assert "the request is dated 1 h" in line.lower() and "check the clocks" in line, line
    assert "Invalid signature" not in line and "does not match" not in line, line


# -- a client whose clock is off, a server whose clock is right --------------------------------

@pytest.mark.integration
def test_a_client_an_hour_off_is_refused_by_name_and_works_once_its_clock_is_right(
        tmp_path: Path, clock: Clock, servers: list[LiveServer]) -> None:
    host = start_server(tmp_path / "host", env={"P2PRC_NAME": "alice"})
    servers.append(host)
    me = tmp_path / "me"
    token = invite(p2prc, host)  # on the host's clock, which is true

    clock.set("+1h")
    added = clock.run(me, "peers", "add", host.peer())  # a record from the past is good
    assert added.returncode == 0 and "first contact" in added.stderr, added.stderr
    pins = PeerTable(me).snapshot().pins
    assert pins and set(pins.values()) == {host.node_id}
    names_the_clocks(clock.run(me, "join", token), ahead="ahead of")

    clock.set("-1h")
    behind = clock.run(me, "peers", "add", host.peer())  # a record from its future is not
    assert behind.returncode == 1, behind.stdout
    assert "sent a node record that does not verify: the record is dated in the future, 1 h " \
           "ahead of this node's clock" in behind.stderr, behind.stderr
    names_the_clocks(clock.run(me, "join", token), ahead="behind")
    assert unused_invites(host) == 1  # nothing spent on the refusals

    clock.set("+0")
    joined = clock.run(me, "join", token)
    assert joined.returncode == 0, joined.stderr
    assert TrustStore(host.home).is_trusted(NodeIdentity.load_or_create(me).node_id)
    assert unused_invites(host) == 0
    assert PeerTable(me).snapshot().pins == pins  # no time in a pin: kept through it all
    assert "first contact" not in joined.stderr
    # A time no clock says (400 digits) is a malformed signature: 401, or unsigned on an open
    # route; never the 500 it was (an int too large for a float).
    headers = {**sign_request(NodeIdentity.generate(), "POST", "/v1/peers", "", b"{}",
                              host.node_id), "X-P2PRC-Time": "9" * 400,
               "Content-Type": "application/json"}
    assert web.post(host.url() + "/v1/peers", content=b"{}", headers=headers,
                    timeout=5).status_code == 200
    join = web.post(host.url() + "/v1/trust/join", content=b"{}", headers=headers, timeout=5)
    assert join.status_code == 401 and join.json()["title"] == "Malformed signature"
    assert "Traceback" not in host.output()


@pytest.mark.integration
def test_containers_ls_says_a_host_is_unreachable_because_of_the_clocks(
        tmp_path: Path, clock: Clock, servers: list[LiveServer]) -> None:
    """A host that refuses the listing for the clocks is shown unreachable, and the line
    under the table (and ``why`` in --json) says it is the clocks, not the network."""
    from test_host_messages import HOST_KEY

    from p2prc_core.my_containers import RemoteContainer, Tracked

    host = start_server(tmp_path / "host", env={"P2PRC_NAME": "alice"})
    servers.append(host)
    me = tmp_path / "me"
    assert clock.run(me, "peers", "add", host.peer()).returncode == 0
    now = time.time()
    Tracked(me).add(RemoteContainer(
        id="cd" * 32, endpoint=f"127.0.0.1:{host.port}", host="127.0.0.1", ssh_port=40022,
        host_key=HOST_KEY, ports=[{"name": "ssh", "internal": 22, "external": 40022}],
        image="p2prc/base:latest", created=now, expires=now + 7200, node_id=host.node_id))

    clock.set("+1h")
    listed = clock.run(me, "containers", "ls")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("cdcd"))
    assert "alice" in row and "unreachable" in row, listed.stdout
    why = [line for line in listed.stderr.splitlines() if "unreachable" in line]
    assert len(why) == 1 and why[0].startswith("alice is unreachable: "), listed.stderr
    assert "this node's clock is 1 h ahead of the peer's" in why[0], why[0]
    rows = json.loads(clock.run(me, "containers", "ls", "--json").stdout)
    assert rows[0]["state"] == "unreachable" and "clock" in rows[0]["why"], rows

    clock.set("+0")  # the clocks agree: the host is asked, and no longer runs it
    rows = json.loads(clock.run(me, "containers", "ls", "--json").stdout)
    assert rows[0]["state"] == "gone" and "why" not in rows[0], rows


# -- a server whose clock jumps, a client whose clock is right ---------------------------------

@pytest.mark.integration
def test_a_host_whose_clock_jumps_an_hour_and_back_recovers_at_once(
        tmp_path: Path, clock: Clock, servers: list[LiveServer]) -> None:
    me = tmp_path / "me"
    me_id = NodeIdentity.load_or_create(me).node_id
    clock.set("+1h")
    host = start_server(tmp_path / "host", env={
        **clock.env, "P2PRC_NAME": "alice", "P2PRC_REAP_SECONDS": "0.5",
        "P2PRC_EXCHANGE_NEWCOMERS_PER_MINUTE": "2", "P2PRC_DISABLE_PLUGINS": "nvidia"})
    servers.append(host)
    token = invite(clock.run, host)  # made on the host's clock, an hour ahead

    # +1h: the host's record is from this node's future; its refusals name the clocks.
    added = p2prc(me, "peers", "add", host.peer())
    assert added.returncode == 1 and "the record is dated in the future, 1 h ahead of this " \
        "node's clock" in added.stderr, added.stderr
    names_the_clocks(p2prc(me, "join", token), ahead="behind")
    assert unused_invites(host) == 1
    # The newcomers limit counts per minute of the host's clock: this minute's 2 of 3.
    assert exchange(host, newcomers(3, "ahead")) == 2

    # Back to the true time: the record is signed again at once, the join works, the invite
    # was not spent before.
    clock.set("+0")
    before = web.get(host.url() + "/v1/node", timeout=5).json()
    assert abs(before["time"] - time.time()) < 60, before  # not an hour ahead
    joined = p2prc(me, "join", token)
    assert joined.returncode == 0, joined.stderr
    assert TrustStore(host.home).is_trusted(me_id) and unused_invites(host) == 0
    assert host.node_id in PeerTable(me).load()
    assert exchange(host, newcomers(3, "true")) == 2  # a minute of its own again

    # An hour behind: refused by name; the reaper still runs (it waited for the clock to
    # catch up: an hour without reaping); its record is signed again, dated by its clock.
    clock.set("-1h")
    names_the_clocks(p2prc(me, "touch", host.peer(), "--image", "p2prc/no-such-image"),
                     ahead="ahead of")  # (an image the host lacks: nothing starts, whatever)
    reap_stamps(host, 3)
    record = web.get(host.url() + "/v1/node", timeout=5).json()
    assert abs(record["time"] + HOUR - time.time()) < 60 and record["seq"] > before["seq"]
    assert verify_record(record) == record  # dated in this node's past: good here
    assert exchange(host, newcomers(3, "behind")) == 2

    clock.set("+0")
    with PeerClient(parse_endpoint(f"{host.node_id}@{host.peer()}"),
                    identity=NodeIdentity.load_or_create(me)) as client:
        assert client.whoami().trusted  # a signed request is good again
    assert len(PeerTable(host.home).load()) == 6  # nothing it took was lost
    assert "Traceback" not in host.output()


def newcomers(count: int, dated: str) -> list[dict[str, Any]]:
    """Records of ``count`` fresh nodes, dated by the true clock or an hour off it."""
    when = int(time.time()) + {"true": 0, "ahead": HOUR, "behind": -HOUR}[dated]
    return [sign_record(NodeIdentity.generate(), {
        "name": f"n{i}", "addresses": [f"2001:db8::{i + 1}"], "port": 8088, "seq": 1,
        "time": when, "specs": {}, "metadata": {}, "version": "0.1.0"}) for i in range(count)]


def exchange(host: LiveServer, records: list[dict[str, Any]]) -> int:
    """How many of ``records`` the host took in an exchange."""
    answer = web.post(host.url() + "/v1/peers", json={"records": records}, timeout=10)
    assert answer.status_code == 200, answer.text
    accepted: int = answer.json()["accepted"]
    return accepted


def reap_stamps(host: LiveServer, count: int) -> list[int]:
    """The reaper's stamp after each of its next ``count`` passes (from now on)."""
    stamp = host.home / "reap.stamp"

    def current() -> int:
        return stamp.stat().st_mtime_ns if stamp.exists() else 0

    seen = [current()]
    for passes in range(count):
        seen.append(wait_for(lambda: current() not in seen and current(), 10,
                             f"the reaper runs again (after {passes} passes)"))
    return seen[1:]


# -- leases on a host whose clock jumps ----------------------------------------------------------

@pytest.mark.docker
@pytest.mark.integration
def test_a_jump_forward_ends_only_the_leases_it_passes_and_a_jump_back_ends_none(
        tmp_path: Path, clock: Clock, engine: Any, servers: list[LiveServer]) -> None:
    me = tmp_path / "me"
    TrustStore(tmp_path / "host").add(NodeIdentity.load_or_create(me).node_id, "me")
    host = start_server(tmp_path / "host", env={
        **clock.env, "P2PRC_REAP_SECONDS": "0.5", "P2PRC_DISABLE_PLUGINS": "nvidia"})
    servers.append(host)

    def running() -> set[str]:
        found = engine.api.containers(
            all=True, filters={"label": f"org.p2prc.node={host.node_id}"})
        return {c["Id"] for c in found if c["State"] == "running"}

    try:
        long, short = (json.loads(p2prc(me, "touch", host.peer(), "--json", "--ttl", ttl)
                                  .stdout)["id"] for ttl in ("2h", "30m"))
        assert {long, short} <= running()
        clock.set("+1h")
        ended = f"container {short[:12]} expired and was removed"  # logged once removed
        wait_for(lambda: short not in running() and ended in host.output(), 20,
                 "the 30-minute lease ends, with its log line")
        assert long in running()
        clock.set("+0")
        reap_stamps(host, 2)  # the reaper passed twice with the clock back: nothing more ends
        assert long in running()
        listed = {c["id"]: c["state"] for c in json.loads(
            p2prc(me, "containers", "ls", "--json").stdout)}
        assert listed == {long: "running", short: "gone"}, listed
        assert f"container {long[:12]} expired" not in host.output()
    finally:
        host.stop()
        for found in engine.api.containers(
                all=True, filters={"label": f"org.p2prc.node={host.node_id}"}):
            engine.api.remove_container(found["Id"], force=True)


# -- the pieces, one at a time --------------------------------------------------------------------

def test_a_signature_an_hour_off_is_refused_naming_the_clocks_the_right_way_round() -> None:
    caller, host = NodeIdentity.generate(), NodeIdentity.generate().node_id
    signed_at = time.time()
    headers = sign_request(caller, "POST", "/v1/x", "", b"", host, now=signed_at)
    for server_now, side in ((signed_at - HOUR, "ahead of"), (signed_at + HOUR, "behind")):
        with pytest.raises(SignatureError) as caught:
            check_signature(headers.get, "POST", "/v1/x", "", b"", 60, host, server_now)
        assert caught.value.title == "Signature expired"
        assert f"The request is dated 1 h {side} this server's clock" in str(caught.value)
    assert check_signature(headers.get, "POST", "/v1/x", "", b"", 60, host,
                           signed_at + 59).node_id == caller.node_id
    # A time no clock says is malformed (it once overflowed a float: a 500).
    headers["X-P2PRC-Time"] = "9" * 400
    with pytest.raises(SignatureError, match="cannot be decoded"):
        check_signature(headers.get, "POST", "/v1/x", "", b"", 60, host)


def test_the_client_measures_the_clocks_from_the_answer_date() -> None:
    now = time.time()
    assert clocks_apart(401, formatdate(now - HOUR, usegmt=True), now).startswith(
        "this node's clock is 1 h ahead of the peer's")
    assert clocks_apart(401, formatdate(now + 2 * HOUR, usegmt=True), now).startswith(
        "this node's clock is 2 h behind the peer's")
    assert clocks_apart(401, formatdate(now + 5, usegmt=True), now) == ""  # close enough
    assert clocks_apart(403, formatdate(now - HOUR, usegmt=True), now) == ""  # not a signature
    for hostile in (None, "", "yesterday", "Mon, 07 Dec 99999 09:26:47 GMT", "x" * 100,
                    "Mon, 07 Dec 2026 99:26:47 GMT"):
        assert clocks_apart(401, hostile, now) == ""


def test_a_record_from_an_hour_ahead_is_dropped_naming_the_clock() -> None:
    now = time.time()
    record = sign_record(NodeIdentity.generate(), {
        "name": "a", "addresses": [], "port": 8088, "seq": 1, "time": int(now + HOUR),
        "specs": {}, "metadata": {}, "version": "0.1.0"})
    with pytest.raises(RecordError, match="future, 1 h ahead of this node's clock") as caught:
        verify_record(record, now)
    assert caught.value.reason == "future"
    assert verify_record(record, now + HOUR) == record
    assert verify_record(record, now + 2 * HOUR) == record  # from the past: good


def test_a_node_whose_clock_went_back_signs_its_record_again(tmp_path: Path) -> None:
    publisher = RecordPublisher(tmp_path, NodeIdentity.generate())
    fields = {"name": "a", "addresses": [], "port": 8088, "specs": {}, "metadata": {},
              "version": "0.1.0"}
    now = time.time()
    ahead = publisher.current(fields, now + HOUR)
    assert publisher.current(fields, now + HOUR + 30) == ahead  # the same while time runs on
    again = publisher.current(fields, now)
    assert again["seq"] == ahead["seq"] + 1 and again["time"] == int(now)
    assert publisher.current(fields, now + 2 * HOUR) == again  # later is not signed again
    verify_record(again, now)


def test_the_reaper_runs_when_the_clock_went_back(tmp_path: Path) -> None:
    ran: list[float] = []
    job = Periodic(tmp_path, "reap", 10, lambda: ran.append(time.time()))
    assert job.run_if_due() is None and len(ran) == 1
    assert job.run_if_due() is None and len(ran) == 1  # within its interval: not again
    later = time.time() + HOUR  # the stamp written before the clock went back an hour
    os.utime(job.stamp, (later, later))
    job.run_if_due()
    assert len(ran) == 2
    slightly = time.time() + 5  # a file server's clock a little ahead: waits as before
    os.utime(job.stamp, (slightly, slightly))
    job.run_if_due()
    assert len(ran) == 2


def test_the_newcomers_limit_counts_per_minute_of_the_hosts_clock(tmp_path: Path) -> None:
    """Whichever way the clock jumps, a minute it shows grants the allowance at most once
    more (a minute lived again may have been forgotten), never more; none is stuck at 0."""
    limit = IntakeLimit(tmp_path, 2)
    source = "192.0.2.0/24"
    for now in (1_800_000_000.0, 1_800_000_030.0 + 60 * 7):  # cleaning up at +1h, and not
        assert limit.admit(source, 3, now) == 2
        assert limit.admit(source, 3, now) == 0
        assert limit.admit(source, 3, now + HOUR) == 2  # a jump forward: a fresh minute
        assert limit.admit(source, 3, now + HOUR) == 0
        assert limit.admit(source, 3, now) <= 2  # and back: that minute, once more at most
        assert limit.admit(source, 3, now) == 0
        assert limit.admit(source, 3, now + 60) == 2  # the next minute's, as ever
