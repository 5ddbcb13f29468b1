"""Reaching a home behind NAT, end to end, in the NAT lab (natlab.py): by a UPnP mapping on
its router, and through a relay on the internet side; checked as a user would, with the CLI
of the nodes involved.

    home --- router (NAT) --- internet (11.0.0.0/24) --- public (relay), friend
                                  \\--- router (NAT) --- friend (a second home)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from natlab import NatLab, missing
from netlab import Host, available

from conftest import require

pytestmark = [pytest.mark.netns, pytest.mark.integration]

PORT = 8088
REACH_TARGET_SECONDS = 10.0  # the product aims at 3 s; this bound leaves room for slow CI

# Fetch a node's signed record at a URL until it lists an address (or the deadline passes):
# what `curl -k https://ADDRESS:8088/v1/node` shows, with its signature checked.
RECORD = r"""
import json, sys, time
import httpx
from p2prc_core.records import verify_record
from p2prc_core.tls import client_context
url, wanted, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
last = None
while True:
    try:
        record = verify_record(httpx.get(url, timeout=2, verify=client_context()).json())
        if wanted in record.get("addresses", []):
            print(json.dumps(record))
            sys.exit(0)
        last = record
    except Exception as err:
        last = repr(err)
    if time.monotonic() > deadline:
        print(json.dumps({"last": last}))
        sys.exit(1)
    time.sleep(0.05)
"""

# Connects once with a short timeout: OK, or FAILED and why.
DIAL = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("OK")
except OSError as err:
    print("FAILED", type(err).__name__, err)
"""

# Says "ready", then asks for NODE's health through RELAY until it answers (TLS end to end
# to NODE, as any client does), and prints the wall-clock time when it first did.
PROBE = r"""
import sys, time
from p2prc_core.client import PeerClient
from p2prc_core.models import Endpoint
host, port, node, relay = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
deadline = time.monotonic() + float(sys.argv[5])
through = Endpoint(host, port, node, False, relay)
last = None
print("ready", flush=True)
while True:
    try:
        with PeerClient([through], timeout=5) as client:
            if client.health().status == "ok":
                print("reached", repr(time.time()), flush=True)
                break
    except Exception as err:  # not there yet: a refusal, a reset, a timeout
        last = err
    if time.monotonic() > deadline:
        print("FAILED", last, flush=True)
        break
    time.sleep(0.02)
"""


# -- helpers --------------------------------------------------------------------------------

@pytest.fixture
def labs(tmp_path: Path) -> Iterator[Callable[..., NatLab]]:
    """Makes NAT labs (skipping when namespaces or tools are missing); closes them all."""
    made: list[NatLab] = []

    def make(upnp: bool = False, natpmp_only: bool = False) -> NatLab:
        reason = available() or missing(upnp=upnp)
        require(reason is None, reason or "")
        lab = NatLab(tmp_path / f"lab{len(made)}", upnp=upnp, natpmp_only=natpmp_only)
        made.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in made:
            lab.close()


def wait_for(condition: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def cli(host: Host, *args: str, **env: str) -> str:
    """Run p2prc in ``host``; its output, failing the test (with stderr) if it fails."""
    result = host.p2prc(*args, **env)
    assert result.returncode == 0, f"p2prc {' '.join(args)} in {host.name}:\n" \
        f"{result.stdout}\n{result.stderr}"
    return result.stdout


def node_id(host: Host) -> str:
    return cli(host, "id").splitlines()[0].strip()


def serve(lab: NatLab, host: Host, **env: str) -> subprocess.Popen[bytes]:
    proc = host.serve(port=PORT, **env)
    lab.wait_listening(host, PORT)
    return proc


def serve_relay(lab: NatLab, host: Host) -> str:
    """``host`` relays for anyone; its ``ID@ADDRESS:PORT``."""
    serve(lab, host, P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true")
    return f"{node_id(host)}@{host.ipv4}:{PORT}"


# Asks NODE at ADDRESS:PORT over UDP where this probe came from; prints what it saw.
UDP_PROBE = r"""
import json, sys
from pathlib import Path
from p2prc_core.identity import NodeIdentity
from p2prc_core.udp_probe import ask
_, seen = ask([(sys.argv[1], int(sys.argv[2]), sys.argv[3])],
              NodeIdentity.load_or_create(Path(sys.argv[4])), timeout=1.5)
print(json.dumps([s.address for s in seen]))
"""


def udp_seen_by(host: Host, address: str, node: str, port: int = PORT) -> list[str]:
    """The addresses ``node`` (at ``address``) says ``host``'s UDP probe came from."""
    result = subprocess.run(host.command(sys.executable, "-c", UDP_PROBE, address, str(port),
                                         node, str(host.home)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    seen: list[str] = json.loads(result.stdout)
    return seen


def dial(host: Host, address: str, port: int = PORT) -> str:
    result = subprocess.run(host.command(sys.executable, "-c", DIAL, address, str(port)),
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def record_at(host: Host, address: str, listing: str, timeout: float = 20) -> dict[str, Any]:
    """The signed record of the node at ``address``:8088, asked from ``host``, once it
    lists ``listing`` among its addresses."""
    url = f"https://{address}:{PORT}/v1/node"
    result = subprocess.run(host.command(sys.executable, "-c", RECORD, url, listing,
                                         str(timeout)),
                            capture_output=True, text=True, timeout=timeout + 30,
                            cwd=Path(__file__).parent.parent)
    answer: dict[str, Any] = json.loads(result.stdout or "{}")
    assert result.returncode == 0, f"{url} never listed {listing}: {answer}\n{result.stderr}"
    return answer


def reach(host: Host) -> dict[str, Any]:
    """``p2prc status --json``'s reach object."""
    state: dict[str, Any] = json.loads(cli(host, "status", "--json"))["reach"]
    return state


def peers(host: Host) -> dict[str, dict[str, Any]]:
    return {p["node_id"]: p for p in json.loads(cli(host, "peers", "ls", "--json"))}


def waits_at(relay: Host, node: str) -> bool:
    """The relay holds ``node``'s poll (its hub's marker file)."""
    return any((relay.home / "relay").glob(f"w.{node}.*"))


def learn_through(friend: Host, public: Host, home: str) -> None:
    """Friend knows only ``public``, and asks it (and whom it tells of) for their tables
    until ``home`` is among them."""
    cli(friend, "peers", "add", f"{public.ipv4}:{PORT}")
    wait_for(lambda: cli(friend, "peers", "update", "--hops", "2") and home in peers(friend),
             what=f"{friend.name} learns of home from {public.name}")


def reaches_through_relay(friend: Host, home: str, relay: str, path: str = "relay",
                          **env: str) -> None:
    """What a user on ``friend`` checks: specs and a speed test of home, met through the
    relay; ``path``: the way ``peers ls`` says they went (``relay``; ``punched`` where the
    two punched a direct path through their NATs)."""
    specs = json.loads(cli(friend, "specs", home, "--json", **env))
    assert specs["cpu"]["cores"] >= 1 and specs["memory"]["total"] > 0
    speed = json.loads(cli(friend, "speedtest", home, "--bytes", "1M", "--json", **env))
    assert [t["direction"] for t in speed["transfers"]] == ["download", "upload"]
    assert all(t["bytes"] == 1 << 20 for t in speed["transfers"])
    entry = peers(friend)[home]
    assert entry["address"] == f"relay {relay}", entry
    assert entry["path"] == path
    assert entry["relays"] == [relay.split("@")[0]]  # home's signed record names it


# -- the tests ------------------------------------------------------------------------------

def test_upnp_maps_the_port_advertises_the_router_and_unmaps_on_stop(
        labs: Callable[..., NatLab]) -> None:
    lab = labs(upnp=True)
    friend = lab.add_internet_host("friend")
    external = lab.router_external_ip
    assert external == "11.0.0.1"
    assert dial(friend, external).startswith("FAILED")  # NAT: no way in, yet
    home = node_id(lab.home)
    server = serve(lab, lab.home, P2PRC_UPNP="true")

    # The router forwards 8088 to home, and home's signed record, fetched through that
    # forward from the internet, lists the router's external address.
    both = wait_for(lambda: len(found := lab.mappings()) == 2 and found,
                    what="home maps its port on the router, TCP and UDP")
    assert sorted((m.protocol, m.external_port, m.internal_ip, m.internal_port)
                  for m in both) == [("TCP", PORT, lab.home.ipv4, PORT),
                                     ("UDP", PORT, lab.home.ipv4, PORT)]
    record = record_at(friend, external, listing=external)
    assert record["node_id"] == home and record["port"] == PORT
    assert record["metadata"] == {"mapped": external}  # which address is the mapping
    upnp = reach(lab.home)["upnp"]
    assert (upnp["external_ip"], upnp["external_port"]) == (external, PORT)
    assert upnp["udp"] is True and ("UDP", PORT) in lab.router.forwarded_ports()
    assert udp_seen_by(friend, external, home) == [friend.ipv4]

    # Friend adds home by the router's address and talks to it by its id.
    added = json.loads(cli(friend, "peers", "add", f"{external}:{PORT}", "--json"))
    assert added["node_id"] == home and added["address"] == f"{external}:{PORT}"
    specs = json.loads(cli(friend, "specs", home, "--json"))
    assert specs["cpu"]["cores"] >= 1
    cli(friend, "peers", "update")
    shown = peers(friend)[home]
    assert (shown["address"], shown["path"]) == (f"{external}:{PORT}", "mapped"), shown

    # Stopped (SIGTERM), home takes its mapping away: the router forwards nothing more.
    lab.home.stop(server)
    assert server.returncode == 0, (lab.home.home / "server.log").read_text()
    assert lab.mappings() == []
    assert lab.router.forwarded_ports() == []
    assert dial(friend, external).startswith("FAILED")
    gone = friend.p2prc("specs", home)
    assert gone.returncode != 0
    assert external in gone.stderr, gone.stderr  # it says where it tried


@pytest.mark.parametrize("protocol", ["PCP", "NAT-PMP"])
def test_a_router_that_speaks_pcp_or_nat_pmp_only_maps_the_port_and_unmaps_on_stop(
        labs: Callable[..., NatLab], protocol: str) -> None:
    """Many routers offer PCP or NAT-PMP and not UPnP: home maps its port with PCP where the
    router speaks it (miniupnpd does), else NAT-PMP, and a friend on the internet reaches
    home at the router's address. The mapping is removed on stop: PCP's with the nonce that
    made it."""
    lab = labs(upnp=True, natpmp_only=True)
    if protocol == "NAT-PMP":
        lab.router.block_pcp()
    friend = lab.add_internet_host("friend")
    external = lab.router_external_ip
    assert dial(friend, external).startswith("FAILED")
    home = node_id(lab.home)
    server = serve(lab, lab.home, P2PRC_UPNP="true")
    wait_for(lambda: ("TCP", PORT) in lab.router.forwarded_ports(),
             what=f"home maps its port on the router with {protocol}")
    assert lab.mappings() == []  # UPnP is off: PCP or NAT-PMP did it
    record = record_at(friend, external, listing=external)
    assert record["node_id"] == home
    mapping = reach(lab.home)["upnp"]
    assert (mapping["external_ip"], mapping["external_port"]) == (external, PORT)
    assert mapping["gateway"] == f"{protocol} at {lab.router.internal_ip}"
    status = cli(lab.home, "status")
    assert f"{protocol} at {lab.router.internal_ip} forwards {external}:{PORT} here (TCP " \
        "and UDP)" in status
    said = (lab.router.log or Path()).read_text(errors="replace")
    assert ("PCP MAP" in said) is (protocol == "PCP"), said
    # UDP is forwarded too: the friend's probe of the router's port reaches home's server.
    assert ("UDP", PORT) in lab.router.forwarded_ports() and mapping["udp"] is True
    assert udp_seen_by(friend, external, home) == [friend.ipv4]
    lab.home.stop(server)
    assert server.returncode == 0, (lab.home.home / "server.log").read_text()
    assert lab.router.forwarded_ports() == []
    assert dial(friend, external).startswith("FAILED")
    assert udp_seen_by(friend, external, home) == []


def test_a_home_without_upnp_is_reached_through_a_configured_relay(
        labs: Callable[..., NatLab]) -> None:
    lab = labs()
    public, friend = lab.add_internet_host("public"), lab.add_internet_host("friend")
    relay = serve_relay(lab, public)
    home = node_id(lab.home)
    serve(lab, lab.home, P2PRC_RELAYS=relay)
    wait_for(lambda: waits_at(public, home), what="home waits at the relay")

    # Home says it is reachable through the relay only: public dialled it back at the
    # router's address and nothing answered.
    state = wait_for(lambda: (r := reach(lab.home))["summary"] == "relay" and r,
                     what="home's status says relay")
    assert state["relay"] == relay
    assert state["upnp"] is None
    assert state["dial_back"]["reachable"] is False
    assert state["dial_back"]["address"] == f"{lab.router_external_ip}:{PORT}"
    table = cli(lab.home, "status")
    assert "through relay" in table and relay.split("@")[0] in table

    # Friend knows only public; it learns home's record (naming the relay) from public, and
    # reaches home through it, though not directly.
    learn_through(friend, public, home)
    # Punching off: every byte through the relay (test_punch_lab.py has the punched paths).
    reaches_through_relay(friend, home, relay, P2PRC_PUNCH="false")
    assert dial(friend, str(lab.home.ipv4)).startswith("FAILED")
    assert dial(friend, lab.router_external_ip).startswith("FAILED")


def test_both_behind_nat_home_picks_a_relay_from_its_table(
        labs: Callable[..., NatLab]) -> None:
    lab = labs()
    public = lab.add_internet_host("public")
    friend = lab.add_home("friend")  # behind a NAT of its own
    relay = serve_relay(lab, public)
    home = node_id(lab.home)
    # No relays configured: home bootstraps from public, whose record offers to relay.
    started = time.monotonic()
    serve(lab, lab.home, P2PRC_BOOTSTRAP=f"{public.ipv4}:{PORT}", P2PRC_REFRESH_SECONDS="300")
    wait_for(lambda: waits_at(public, home), timeout=30, what="home picks public as its relay")
    print(f"\nhome, bootstrapped from public, waits at it as its relay "
          f"{time.monotonic() - started:.1f} s after its server started")
    state = reach(lab.home)
    assert (state["summary"], state["relay"]) == ("relay", relay)

    learn_through(friend, public, home)
    reaches_through_relay(friend, home, relay, path="punched")  # met there, then direct
    assert dial(friend, str(lab.home.ipv4)).startswith("FAILED")
    assert dial(friend, lab.router_external_ip).startswith("FAILED")


def test_time_from_server_start_to_reachable_through_the_relay(
        labs: Callable[..., NatLab]) -> None:
    lab = labs()
    public, friend = lab.add_internet_host("public"), lab.add_internet_host("friend")
    relay = serve_relay(lab, public)
    relay_id = relay.split("@")[0]
    home = node_id(lab.home)
    # Friend asks for home through the relay from before home's server starts, so the
    # figure holds only home's own start-up and its way to the relay.
    friend.spawn(sys.executable, "-u", "-c", PROBE, str(public.ipv4), str(PORT), home,
                 relay_id, str(REACH_TARGET_SECONDS + 20), log="probe.log")
    log = friend.home / "probe.log"
    wait_for(lambda: "ready" in log.read_text(), what="the probe starts")
    started = time.time()
    serve(lab, lab.home, P2PRC_RELAYS=relay)
    line = wait_for(lambda: next((x for x in log.read_text().splitlines()
                                  if x.startswith(("reached", "FAILED"))), None),
                    timeout=REACH_TARGET_SECONDS + 30, what="the probe ends")
    assert line.startswith("reached"), line
    seconds = float(line.split()[1]) - started
    print(f"\nhome reachable through the relay {seconds:.2f} s after its server started "
          f"(target 3 s)")
    assert 0 < seconds < REACH_TARGET_SECONDS
