"""Faults: the network splits in two for longer than it takes to give up on a peer, then
heals. Twenty real servers in namespaces (IPv4 and IPv6), each refreshing its table every
few seconds and starting from the first one (``bootstrap``); a firewall in every namespace
drops what comes from the other half.

What a user would check: before the split every node knows the 19 others; during it each
node drops the other half (the split had effect); once healed, within two refreshes, every
node knows every other again, and no live peer is left counted as gone (before the fix in
``Discovery.contact``, the half without the first node stayed cut off from the other for
``GONE_SECONDS``, an hour: their digests counted each other as gone and matched).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab import P2PRC, Host, NetLab, available, run

from conftest import require
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable, TableState

pytestmark = [pytest.mark.netns, pytest.mark.integration]

HOSTS = 20
REFRESH_SECONDS = 3
MAX_FAILURES = 2
PORT = 8088
# Each server: a short refresh; a fan-out that takes in the whole table, so that each
# refresh asks every peer and a refresh is the unit things are counted in (with the default
# of 4, a peer behind the cut is asked, and dropped, only when a random pick finds it: over
# 90 s here); one latency probe (less load on a small machine); timeouts short enough that
# a peer behind the cut fails within a refresh rather than after half a minute.
SETTINGS = {"P2PRC_REFRESH_SECONDS": str(REFRESH_SECONDS),
            "P2PRC_PEER_MAX_FAILURES": str(MAX_FAILURES),
            "P2PRC_UPDATE_FANOUT": str(HOSTS),
            "P2PRC_LATENCY_PROBES": "1",
            "P2PRC_REQUEST_TIMEOUT": "3",
            "P2PRC_PEER_TIME_BUDGET": "4",
            "P2PRC_ACCESS_LOG": "false"}
CUT_TABLE = "p2prc_partition"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetLab]:
    reason = available()
    require(reason is None, reason or "")
    require(shutil.which("nft") is not None, "nft (nftables) is missing: it makes the cut")
    net = NetLab(tmp_path)
    try:
        yield net
    finally:
        net.close()  # the namespaces go, and the firewall rules in them with them


class Partition:
    """Each namespace drops every packet that comes from the other half, IPv4 and IPv6, as
    a broken link between two sites would lose them (silently: no reset, no ICMP)."""

    def __init__(self, left: list[Host], right: list[Host]):
        self.sides = [(left, right), (right, left)]

    def cut(self) -> None:
        for here, there in self.sides:
            v4 = ", ".join(h.ipv4 for h in there if h.ipv4)
            v6 = ", ".join(h.ipv6 for h in there if h.ipv6)
            rules = (f"table inet {CUT_TABLE} {{\n"
                     "  chain input {\n"
                     "    type filter hook input priority -10; policy accept;\n"
                     f"    ip saddr {{ {v4} }} drop\n"
                     f"    ip6 saddr {{ {v6} }} drop\n"
                     "  }\n}\n")
            for host in here:
                subprocess.run(host.command("nft", "-f", "-"), input=rules, text=True,
                               check=True, capture_output=True, timeout=30)

    def heal(self) -> None:
        for here, _ in self.sides:
            for host in here:
                run(*host.command("nft", "delete", "table", "inet", CUT_TABLE), check=False)


class Refreshes:
    """Counts each host's refreshes: the server touches ``refresh.stamp`` after each."""

    def __init__(self, hosts: list[Host]):
        self.hosts = hosts
        self.last = {h.name: self._stamp(h) for h in hosts}
        self.count = dict.fromkeys(self.last, 0)

    @staticmethod
    def _stamp(host: Host) -> float | None:
        try:
            return (host.home / "refresh.stamp").stat().st_mtime
        except FileNotFoundError:
            return None

    def poll(self) -> None:
        for host in self.hosts:
            stamp = self._stamp(host)
            if stamp != self.last[host.name]:
                self.last[host.name] = stamp
                self.count[host.name] += 1

    def restart(self) -> None:
        self.poll()
        self.count = dict.fromkeys(self.count, 0)


def tables(hosts: list[Host]) -> dict[str, TableState]:
    return {h.name: PeerTable(h.home).snapshot() for h in hosts}


def wait_until(condition: Callable[[], bool], timeout: float, refreshes: Refreshes,
               what: Callable[[], str], give_up: Callable[[], bool] = lambda: False) -> float:
    """Poll ``condition`` (counting refreshes meanwhile) until it holds, or fail once
    ``timeout`` seconds passed or ``give_up`` holds; the seconds taken."""
    started = time.monotonic()
    while True:
        refreshes.poll()
        if condition():
            return time.monotonic() - started
        took = time.monotonic() - started
        if took > timeout or give_up():
            raise AssertionError(f"not after {took:.1f} s and refreshes {refreshes.count}: "
                                 f"{what()}")
        time.sleep(0.2)


def test_a_partition_longer_than_the_failures_allowed_heals_within_two_refreshes(
        lab: NetLab) -> None:
    started = time.monotonic()
    hosts = [lab.add_host(f"n{i}") for i in range(HOSTS)]
    for number, host in enumerate(hosts):
        start_from = hosts[1] if number == 0 else hosts[0]
        host.spawn(P2PRC, "server", "--port", str(PORT), log="server.log",
                   P2PRC_BOOTSTRAP=f"[{start_from.ipv6}]:{PORT}", **SETTINGS)
    for host in hosts:
        host.wait_ready(timeout=90)
    node = {h.name: NodeIdentity.load_or_create(h.home).node_id for h in hosts}
    everyone = set(node.values())
    left, right = hosts[:HOSTS // 2], hosts[HOSTS // 2:]
    side = {h.name: {node[o.name] for o in (left if h in left else right)} - {node[h.name]}
            for h in hosts}

    def known() -> dict[str, set[str]]:
        return {name: set(state.peers) for name, state in tables(hosts).items()}

    def counts() -> str:
        return " ".join(f"{name}:{len(ids)}" for name, ids in known().items())

    def whole() -> bool:
        return all(ids == everyone - {node[n]} for n, ids in known().items())

    # Before: every node knows the 19 others.
    refreshes = Refreshes(hosts)
    took = wait_until(whole, 120, refreshes, lambda: f"every node knows all others: {counts()}")
    print(f"\nbefore the split: all {HOSTS} know {HOSTS - 1} others, {took:.1f} s after "
          f"the servers answered ({time.monotonic() - started:.1f} s since the start)")

    # The split: after more than MAX_FAILURES refreshes, each node has dropped the other
    # half (and holds its own).
    partition = Partition(left, right)
    series: list[str] = []

    def split_done() -> bool:
        tables_now = known()
        rounds = min(refreshes.count.values())
        if len(series) < rounds:  # each node's table, once all did one more refresh
            series.append(f"{rounds}: " + " ".join(f"{n}:{len(ids)}"
                                                   for n, ids in tables_now.items()))
        return rounds > MAX_FAILURES and all(ids == side[n] for n, ids in tables_now.items())

    def still_held() -> str:
        """The peers of the other half each node still holds, as its table has them."""
        return "; ".join(f"{name} holds {entry.name} {entry.node_id[:6]}: "
                         f"{entry.measured.to_json()}"
                         for name, state in tables(hosts).items()
                         for entry in state.peers.values() if entry.node_id not in side[name])

    refreshes.restart()
    cut_at = time.monotonic()
    try:
        partition.cut()
        took = wait_until(split_done, 120, refreshes,
                          lambda: f"each node knows its half only: {counts()}; {still_held()}")
        print(f"split: every node dropped the other half {took:.1f} s after the cut "
              f"({min(refreshes.count.values())} to {max(refreshes.count.values())} refreshes "
              f"each); known per node after each round of refreshes:\n  " + "\n  ".join(series))
        refreshes.restart()  # refreshes and seconds count from here
        healing = time.monotonic()
    finally:
        partition.heal()
    split_seconds = healing - cut_at

    # Healed: within two refreshes of each node (besides the one under way at the heal),
    # every node knows every other again, and none is left counted as gone.
    limit = 1 + 2
    try:
        wait_until(whole, 30 * REFRESH_SECONDS, refreshes,
                   lambda: f"the tables converge again: known per node {counts()}",
                   give_up=lambda: max(refreshes.count.values()) > limit)
    finally:
        took = time.monotonic() - healing
        most = max(refreshes.count.values())
        print(f"healed: {took:.1f} s after the heal, each node had done at most {most} "
              f"refresh(es) since (median {statistics.median(refreshes.count.values()):g}; "
              f"one every {REFRESH_SECONDS} s, plus its own time); known per node: "
              f"{counts()}; the split lasted {split_seconds:.1f} s")
    figure = (f"every node knew all {HOSTS - 1} others {took:.1f} s after the heal, each "
              f"within {most} refresh(es)")
    assert most <= limit, figure
    for name, state in tables(hosts).items():
        assert not set(state.gone) & everyone, f"{name} still counts live peers as gone; " \
            f"{figure}"
    for host in (hosts[1], hosts[-1]):  # as a user sees it, on each side
        listed = host.p2prc("peers", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {p["node_id"] for p in json.loads(listed.stdout)} == everyone - {node[host.name]}
    print(f"{figure}; the whole test took {time.monotonic() - started:.1f} s")
