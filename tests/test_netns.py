"""Discovery across real hosts: p2prc servers in network namespaces, IPv4 and IPv6."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab import Host, NetLab, available

from conftest import require, web
from p2prc_core.peertable import PeerTable
from p2prc_core.records import verify_record

pytestmark = [pytest.mark.netns, pytest.mark.integration]

RELAY = str(Path(__file__).with_name("relay.py"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetLab]:
    reason = available()
    require(reason is None, reason or "")
    net = NetLab(tmp_path)
    try:
        yield net
    finally:
        net.close()


def url(host: Host, port: int = 8088, v6: bool = True) -> str:
    return f"https://[{host.ipv6}]:{port}" if v6 and host.ipv6 else f"https://{host.ipv4}:{port}"


def record_of(host: Host, port: int = 8088, v6: bool = True) -> dict[str, Any]:
    return verify_record(web.get(url(host, port, v6) + "/v1/node", timeout=5).json())


def seed(host: Host, *others: Host) -> None:
    """Make ``host`` know exactly ``others`` (their signed records), and nothing else."""
    table = PeerTable(host.home, record_of(host)["node_id"])
    result = table.merge([record_of(o) for o in others])
    assert len(result.added) == len(others), result


def known(host: Host) -> dict[str, dict[str, Any]]:
    return {p["node_id"]: p for p in json.loads(host.p2prc("peers", "ls", "--json").stdout)}


def ids(*hosts: Host, v6: bool = True) -> set[str]:
    return {record_of(h, v6=v6)["node_id"] for h in hosts}


def serve_all(*hosts: Host) -> None:
    for host in hosts:
        host.serve()
    for host in hosts:
        host.wait_ready()


def test_a_chain_of_five_is_found_whole_with_four_hops_not_one(lab: NetLab) -> None:
    chain = [lab.add_host(f"c{i}") for i in range(5)]
    serve_all(*chain)
    for left, right in zip(chain, chain[1:], strict=False):
        seed(left, right)
    one = chain[0].p2prc("peers", "update", "--hops", "1")
    assert one.returncode == 0, one.stderr
    assert set(known(chain[0])) == ids(chain[1], chain[2])  # chain[1] told of chain[2] only
    four = chain[0].p2prc("peers", "update", "--hops", "4", "--json")
    assert four.returncode == 0, four.stderr
    assert set(known(chain[0])) == ids(*chain[1:])
    # Each peer asked also learned of chain[0], from the exchange.
    assert ids(chain[0]) <= set(known(chain[4]))


def test_dual_stack_is_dialled_over_ipv6_and_ipv4_only_still_works(lab: NetLab) -> None:
    client = lab.add_host("client")
    dual = lab.add_host("dual")
    v4only = lab.add_host("v4only", ipv6=False)
    broken6 = lab.add_host("broken6")  # has IPv6, but its server listens on IPv4 only
    serve_all(dual, v4only)
    broken6.serve("--host", "0.0.0.0")
    broken6.wait_ready(v6=False)
    for peer in (dual, v4only, broken6):
        added = client.p2prc("peers", "add", f"{peer.ipv4}:8088")
        assert added.returncode == 0, added.stderr
    update = client.p2prc("peers", "update", "--hops", "1", "--json")
    assert update.returncode == 0 and json.loads(update.stdout)["failed"] == {}
    table = known(client)
    (dual_id,), (v4_id,), (broken_id,) = ids(dual), ids(v4only), ids(broken6, v6=False)
    assert table[dual_id]["address"] == f"[{dual.ipv6}]:8088"
    assert table[v4_id]["address"] == f"{v4only.ipv4}:8088"
    assert table[broken_id]["address"] == f"{broken6.ipv4}:8088"  # fell back to IPv4
    for entry in table.values():
        assert entry["failures"] == 0 and entry["latency_ms"] is not None


def test_a_peer_behind_a_30ms_relay_ranks_below_one_without(lab: NetLab) -> None:
    client, fast, slow = lab.add_host("client"), lab.add_host("fast"), lab.add_host("slow")
    fast.serve()
    # slow's server listens inside its namespace only; the world reaches it through a relay
    # that delays every chunk by 30 ms, on the port its record advertises.
    slow.serve("--host", "127.0.0.1", port=9000, P2PRC_ADVERTISE_PORT="8088")
    slow.spawn(sys.executable, RELAY, "8088", "127.0.0.1", "9000", "30", log="relay.log")
    fast.wait_ready()
    slow.wait_ready()
    for peer in (slow, fast):
        assert client.p2prc("peers", "add", f"[{peer.ipv6}]:8088").returncode == 0
    assert client.p2prc("peers", "update", "--hops", "1").returncode == 0
    ranked = json.loads(client.p2prc("peers", "ls", "--json").stdout)
    (fast_id,), (slow_id,) = ids(fast), ids(slow)
    assert [p["node_id"] for p in ranked] == [fast_id, slow_id]
    latency = {p["node_id"]: p["latency_ms"] for p in ranked}
    assert latency[slow_id] >= 55, latency  # 30 ms each way at least
    assert latency[fast_id] < 20, latency


def test_a_stopped_peer_is_removed_after_the_configured_failures(lab: NetLab) -> None:
    client, steady, doomed = lab.add_host("client"), lab.add_host("steady"), lab.add_host("doomed")
    serve_all(steady, doomed)
    for peer in (steady, doomed):
        assert client.p2prc("peers", "add", f"[{peer.ipv6}]:8088").returncode == 0
    doomed_id = next(iter(ids(doomed)))
    for proc in doomed.processes:
        doomed.stop(proc)
    first = client.p2prc("peers", "update", "--json", P2PRC_PEER_MAX_FAILURES="2")
    assert doomed_id in json.loads(first.stdout)["failed"]
    assert known(client)[doomed_id]["failures"] == 1
    second = json.loads(client.p2prc("peers", "update", "--json",
                                     P2PRC_PEER_MAX_FAILURES="2").stdout)
    assert second["removed"] == [doomed_id]
    assert set(known(client)) == ids(steady)


def test_loopback_and_link_local_from_a_table_are_never_added(lab: NetLab) -> None:
    client, mixed, liar = lab.add_host("client"), lab.add_host("mixed"), lab.add_host("liar")
    # mixed advertises its real address and some it must not make anyone dial; liar
    # advertises only such addresses, and mixed's table is where the client hears of it.
    mixed.serve(P2PRC_ADVERTISE_ADDRESSES=f"127.0.0.1,::1,fe80::1,{mixed.ipv6}")
    liar.serve(P2PRC_ADVERTISE_ADDRESSES="127.0.0.1,::1,fe80::1,169.254.169.254",
               P2PRC_ALLOW_LOOPBACK="true")
    mixed.wait_ready()
    liar.wait_ready()
    assert mixed.p2prc("peers", "add", f"[{liar.ipv6}]:8088",
                       P2PRC_ALLOW_LOOPBACK="true").returncode == 0
    client.serve()  # only so that seed() can read client's own node id
    client.wait_ready()
    seed(client, mixed)
    update = json.loads(client.p2prc("peers", "update", "--hops", "2", "--json").stdout)
    table = known(client)
    assert set(table) == ids(mixed)  # liar, heard of through mixed, was not added
    assert update["dropped"]["no-address"] == 1
    entry = PeerTable(client.home).load()[next(iter(ids(mixed)))]
    dialled = [str(a) for a in PeerTable(client.home).dial_addresses(entry.record)]
    assert dialled == [mixed.ipv6]


def test_a_node_with_reachable_ipv6_is_dialled_directly_not_through_its_relay(
        lab: NetLab) -> None:
    relay, home, friend = (lab.add_host(n) for n in ("relay", "home", "friend"))
    relay.serve(P2PRC_RELAY="true", P2PRC_RELAY_OPEN="true")
    relay.wait_ready()
    relay_id = relay.p2prc("id").stdout.split()[0]
    home.serve(P2PRC_USE_RELAY="auto", P2PRC_RELAYS=f"{relay_id}@[{relay.ipv6}]:8088")
    home.wait_ready()
    deadline = time.monotonic() + 20
    while True:  # home asks the relay to dial it back, over IPv6, and keeps no relay
        state = json.loads(home.p2prc("status", "--json").stdout)["reach"]
        if state["dial_back"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state["summary"] == "direct" and state["relay"] is None, state
    assert state["dial_back"]["address"] == f"[{home.ipv6}]:8088"
    assert "relays" not in record_of(home)
    assert friend.p2prc("peers", "add", f"[{home.ipv6}]:8088").returncode == 0
    entry = known(friend)[record_of(home)["node_id"]]
    assert entry["address"] == f"[{home.ipv6}]:8088"
    assert friend.p2prc("specs", entry["node_id"]).returncode == 0
    assert not any((relay.home / "relay").glob("w.*"))  # nothing waits at the relay
