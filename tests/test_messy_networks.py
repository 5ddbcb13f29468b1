"""Reach on messy networks (issue 22): a relay with an address some peers cannot dial, a
relay that reaches the nodes waiting at it, and two homes on one machine.

    home --- router (NAT) --- internet (11.0.0.0/24) --- public (relay; also 2a10:77::2,
                                                                  which home cannot route)
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from natlab import NatLab
from netlab import Host, NetLab, available, run
from test_containers import docker_client, host, me, touch
from test_natlab import PORT, cli, labs, node_id, peers, reach, serve, wait_for, waits_at

from conftest import (
    P2PRC,
    LiveServer,
    free_port,
    ipv6_loopback_works,
    require,
    serve_tls,
    start_server,
)
from p2prc_core.identity import NodeIdentity
from p2prc_core.reach_state import REACHED_MAX, ReachedAt, ReachState
from p2prc_core.records import verify_record
from p2prc_core.tls import client_context

__all__ = ["docker_client", "host", "labs"]  # fixtures, used by name

# An address of the relay that nothing in the lab routes to (home has no IPv6 route at all:
# its kernel refuses at once, nothing is sent). A global one, so that it is dialled first.
UNROUTABLE = "2a10:77::2"


def add_unroutable_address(host: Host) -> None:
    """Give ``host`` an address that no other namespace routes to (as a lab's or a VPN's
    would be for most peers)."""
    run("ip", "netns", "exec", host.namespace, "ip", "-6", "addr", "add",
        f"{UNROUTABLE}/128", "dev", "lo", "nodad")


@pytest.mark.netns
@pytest.mark.integration
def test_a_relay_is_dialled_at_every_address_and_reaches_the_node_waiting_at_it(
        labs: Callable[..., NatLab]) -> None:
    lab = labs()
    public = lab.add_internet_host("public")
    add_unroutable_address(public)
    # The relay advertises the address home cannot route to first (IPv6 first, too).
    serve(lab, public, P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true",
          P2PRC_ADVERTISE_ADDRESSES=f"{UNROUTABLE},{public.ipv4}")
    relay_id = node_id(public)
    home = node_id(lab.home)
    serve(lab, lab.home, P2PRC_BOOTSTRAP=f"{public.ipv4}:{PORT}", P2PRC_REFRESH_SECONDS="300")

    # Home dials the relay's whole ladder, and waits at the address that answered.
    wait_for(lambda: waits_at(public, home), timeout=30,
             what="home waits at public, reached at its second address")
    state = reach(lab.home)
    assert (state["summary"], state["relay"]) == ("relay", f"{relay_id}@{public.ipv4}:{PORT}")

    # The relay reaches home through its own hub: its updates keep home (more of them than
    # it takes to drop a peer that fails), and a user on the relay asks home for its specs.
    wait_for(lambda: home in peers(public), what="home hands public its record")
    for _ in range(4):  # peer_max_failures is 3
        summary = json.loads(cli(public, "peers", "update", "--json"))
        assert summary["failed"] == {} and summary["removed"] == [], summary
    row = peers(public)[home]
    assert row["failures"] == 0 and row["path"] == "relay", row
    specs = json.loads(cli(public, "specs", home, "--json"))
    assert specs["cpu"]["cores"] >= 1


def test_a_second_home_on_the_same_machine_dials_the_other_node(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    """A client-only home whose settings name the same port (the default, 8088, for both in
    real life) and the same addresses as the server running on this machine."""
    server = start_server(tmp_path / "server-home")
    servers.append(server)
    env = {"P2PRC_HOME": str(tmp_path / "client-home"), "P2PRC_PORT": str(server.port),
           "P2PRC_ALLOW_LOOPBACK": "true",
           "P2PRC_ADVERTISE_ADDRESSES": "::1,127.0.0.1" if ipv6_loopback_works()
           else "127.0.0.1",
           "PATH": str(Path(P2PRC).parent)}

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([P2PRC, *args], capture_output=True, text=True, env=env,
                              timeout=60)

    added = client("peers", "add", f"127.0.0.1:{server.port}")
    assert added.returncode == 0, added.stderr
    updated = client("peers", "update", "--json")
    assert updated.returncode == 0, updated.stdout + updated.stderr
    summary = json.loads(updated.stdout)
    assert summary["failed"] == {}, summary
    specs = client("specs", server.node_id, "--json")
    assert specs.returncode == 0, specs.stderr


@pytest.mark.integration
def test_an_ssh_config_entry_follows_its_host_to_where_it_answers_now(
        tmp_path: Path, host: LiveServer, servers: list[LiveServer]) -> None:
    """``ssh-config --write`` once; the host moves (here: its server comes back at another
    port, as after a move behind a relay its paths change); plain ssh still gets in, once
    the table knows where the host is (an update, or the client's own server's refresh)."""
    reply = touch(tmp_path, host)
    short = reply["id"][:12]
    assert me(tmp_path, "peers", "add", host.peer()).returncode == 0
    assert me(tmp_path, "ssh-config", "--write").returncode == 0
    config = tmp_path / "me" / "ssh" / "config"
    host.stop()
    moved = start_server(host.home, env={"P2PRC_DISABLE_PLUGINS": "nvidia"})
    servers.append(moved)
    assert moved.port != host.port
    added = me(tmp_path, "peers", "add", moved.peer())
    assert added.returncode == 0, added.stderr

    def hostname() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-F", str(config), f"p2prc-{short}", "hostname"],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    result = wait_for(lambda: (r := hostname()).returncode != 255 and r, timeout=20,
                      what="ssh through the entry written before the move")
    assert result.returncode == 0 and result.stdout.strip() == short, result.stderr


def served_record(host: Host) -> dict[str, Any]:
    """The signed record ``host``'s server serves, as a peer fetches it, checked."""
    answer = httpx.get(f"https://{host.ipv4}:{PORT}/v1/node", timeout=5,
                       verify=client_context())
    record: dict[str, Any] = verify_record(answer.json())
    return record


@pytest.mark.netns
@pytest.mark.integration
def test_a_server_advertises_what_peers_can_use_and_learns_where_they_reached_it(
        tmp_path: Path) -> None:
    """A host on a network with a default route (the lab's bridge) and on a side link of its
    own (a lab's or a VPN's, no default route): it advertises the first only, until a peer
    reaches it on the side link; then that address is in its record too."""
    reason = available()
    require(reason is None, reason or "")
    lab = NetLab(tmp_path / "lab")
    side_ns = f"p2side-{lab.tag}"
    try:
        srv = lab.add_host("srv")
        run(*srv.command("ip", "route", "add", "default", "via", f"{lab.v4_prefix}.1"))
        side_ip, side_peer_ip = f"10.77.{int(lab.tag[:2], 16)}.1", \
            f"10.77.{int(lab.tag[:2], 16)}.2"
        run("ip", "netns", "add", side_ns)
        a, b = f"p2s{lab.tag[:4]}a", f"p2s{lab.tag[:4]}b"
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        run("ip", "link", "set", a, "netns", srv.namespace)
        run("ip", "link", "set", b, "netns", side_ns)
        run(*srv.command("ip", "addr", "add", f"{side_ip}/24", "dev", a))
        run(*srv.command("ip", "link", "set", a, "up"))
        run("ip", "netns", "exec", side_ns, "ip", "addr", "add", f"{side_peer_ip}/24", "dev", b)
        run("ip", "netns", "exec", side_ns, "ip", "link", "set", b, "up")
        run("ip", "netns", "exec", side_ns, "ip", "link", "set", "lo", "up")
        side_peer = Host("side", side_ns, side_peer_ip, None, tmp_path / "side")
        side_peer.home.mkdir()

        srv.serve(port=PORT)
        srv.wait_ready(PORT)
        rows = {r["address"]: r for r in
                json.loads(cli(srv, "interfaces", "--json"))["addresses"]}
        assert "no default route" in rows[side_ip]["why"], rows[side_ip]
        record = served_record(srv)
        assert srv.ipv4 in record["addresses"] and side_ip not in record["addresses"], record

        # A peer on the side link reaches it there: from then on it is advertised too.
        cli(side_peer, "peers", "add", f"{side_ip}:{PORT}")
        wait_for(lambda: side_ip in served_record(srv)["addresses"],
                 what="the address a peer reached it at is advertised")
        rows = {r["address"]: r for r in
                json.loads(cli(srv, "interfaces", "--json"))["addresses"]}
        assert rows[side_ip]["preference"] is not None, rows[side_ip]
    finally:
        run("ip", "netns", "del", side_ns, check=False)
        lab.close()


def test_where_peers_reached_us_is_noted_sparingly_and_read_with_care(tmp_path: Path) -> None:
    reached = ReachedAt(tmp_path)
    state = ReachState(tmp_path)
    for junk in (None, "", "not an address", "127.0.0.1", "::1", "fe80::1", "0.0.0.0"):
        reached.note(junk)
    assert state.reached() == {}  # loopback (relayed clients), link-local, junk: not kept
    reached.note("::ffff:10.77.0.1")  # an IPv4 peer on a dual-stack socket
    assert list(state.reached()) == ["10.77.0.1"]
    stamp = state.stamp()
    reached.note("10.77.0.1")  # noted within the hour: no write
    assert state.stamp() == stamp
    for n in range(40):
        reached.note(f"10.78.0.{n + 1}")
    assert len(state.reached()) == REACHED_MAX
    # A reach.json edited by hand, or half-understood: what is not an address and a time is
    # left out, as is what is older than a week.
    state.update(reached={"10.1.1.1": "yesterday", "10.2.2.2": time.time() - 8 * 86400,
                          "10.3.3.3": time.time(), "10.4.4.4": [1]})
    assert list(state.reached()) == ["10.3.3.3"]
    state.update(reached=["10.3.3.3"])
    assert state.reached() == {}


def test_a_kernel_without_ipv6_gets_a_server_on_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    """Booted with ipv6.disable=1, a machine cannot even make an IPv6 socket: the default
    host '::' falls back to 0.0.0.0 (a kernel like that cannot be booted by a test: the
    socket call is made to fail as it does there)."""
    import errno
    import socket

    from p2prc_core.server.run import bind_socket

    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    sock = bind_socket("::", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0"
    finally:
        sock.close()


def test_a_node_falls_over_to_the_next_relay_when_one_answers_at_no_address(
        tmp_path: Path, servers: list[LiveServer]) -> None:
    """The first relay configured answers at none of its addresses (nothing listens there):
    the node moves on to the second and waits there."""
    relay = start_server(tmp_path / "relay", env={"P2PRC_RELAY": "true",
                                                  "P2PRC_RELAY_OPEN": "true"})
    servers.append(relay)
    dead = f"{NodeIdentity.generate().node_id}@127.0.0.1:{free_port()}"
    home = start_server(tmp_path / "home", env={
        "P2PRC_USE_RELAY": "always",
        "P2PRC_RELAYS": f"{dead},{relay.node_id}@127.0.0.1:{relay.port}"})
    servers.append(home)
    wait_for(lambda: any((relay.home / "relay").glob(f"w.{home.node_id}.*")), timeout=30,
             what="home gives up on the dead relay and waits at the second")


class RefusingRelay(http.server.BaseHTTPRequestHandler):
    """A relay that refuses every connect, as one whose owner stopped relaying does."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = json.dumps({"title": "Not a relay", "description": "no"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_relays_refusal_is_not_taken_for_the_hosts(tmp_path: Path) -> None:
    """A 403 from a relay on the way is the relay's (RelayRefused): touch does not note
    that the host will not host us, as it does for the host's own 403."""
    from p2prc_core.channel import relayed
    from p2prc_core.errors import PeerRefused, RelayRefused
    from p2prc_core.models import Endpoint

    relay_id = NodeIdentity.generate()
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingRelay)
    fake.daemon_threads = True
    serve_tls(fake, relay_id, tmp_path / "relay")
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        host = NodeIdentity.generate().node_id
        path = Endpoint("127.0.0.1", fake.server_address[1], relay_id.node_id).through(host)
        with pytest.raises(RelayRefused) as refused:
            relayed(path, 5)
        assert refused.value.status == 403 and isinstance(refused.value, PeerRefused)
    finally:
        fake.shutdown()
        fake.server_close()
