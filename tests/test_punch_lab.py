"""Two homes behind NATs, met through a relay, reach each other direct over a punched UDP path
(QUIC), or fall back to the relay fast where their NATs do not allow it: the NAT lab's matrix
(issue 24), checked as a user would, with the CLI of the nodes involved.

    home --- router (NAT kind A) --- internet (11.0.0.0/24) --- public (the relay)
                                         \\--- router (NAT kind B) --- friend
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from natlab import NatLab, missing
from netlab import Host, available, run
from test_natlab import (
    cli,
    learn_through,
    node_id,
    peers,
    reach,
    serve,
    serve_relay,
    wait_for,
    waits_at,
)

from conftest import require
from p2prc_core.trust import TrustStore

pytestmark = [pytest.mark.netns, pytest.mark.integration]

FALLBACK_SECONDS = 3.0  # the bound on a try that cannot punch


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[..., tuple[NatLab, Host, str, str]]]:
    """Makes a lab: home behind a NAT of kind A, friend behind one of kind B, a public
    relay; home waits at the relay and friend knows of home through it; with ``trusted``,
    home trusts friend. Gives the lab, friend, home's node id and the relay
    (``ID@ADDRESS:PORT``)."""
    made: list[NatLab] = []

    def make(home_nat: str, friend_nat: str,
             trusted: bool = False) -> tuple[NatLab, Host, str, str]:
        reason = available() or missing()
        require(reason is None, reason or "")
        lab = NatLab(tmp_path / f"lab{len(made)}", nat=home_nat)
        made.append(lab)
        public = lab.add_internet_host("public")
        friend = lab.add_home("friend", nat=friend_nat)
        relay = serve_relay(lab, public)
        home = node_id(lab.home)
        if trusted:
            TrustStore(lab.home.home).add(node_id(friend), "friend")
        serve(lab, lab.home, P2PRC_RELAYS=relay)
        wait_for(lambda: waits_at(public, home), what="home waits at the relay")
        learn_through(friend, public, home)
        return lab, friend, home, relay

    try:
        yield make
    finally:
        for lab in made:
            lab.close()


def relay_bytes(lab: NatLab) -> int:
    """Bytes the relay's namespace has received and sent, all its interfaces together."""
    public = next(h for h in lab.hosts if h.name == "public")
    links = json.loads(run("ip", "-n", public.namespace, "-s", "-j", "link", "show").stdout)
    return sum(link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
               for link in links if link["ifname"] != "lo")


def remembered(friend: Host, home: str) -> dict[str, object]:
    state = json.loads((friend.home / "punched.json").read_text())
    entry: dict[str, object] = state[home]
    return entry


def test_two_cone_nats_punch_and_a_transfer_skips_the_relay(
        pair: Callable[..., tuple[NatLab, Host, str, str]]) -> None:
    lab, friend, home, _ = pair("cone", "cone")
    before = relay_bytes(lab)
    started = time.monotonic()
    speed = json.loads(cli(friend, "speedtest", home, "--bytes", "20M", "--json"))
    took = time.monotonic() - started
    carried = relay_bytes(lab) - before
    assert [t["bytes"] for t in speed["transfers"]] == [20 << 20, 20 << 20]
    entry = remembered(friend, home)
    assert entry["path"] == "punched", entry
    assert str(entry["why"]).startswith(lab.router_external_ip + ":"), entry
    # 40 MiB crossed between friend and home; the relay carried the punch's offer only.
    assert carried < 0.01 * (40 << 20), f"the relay carried {carried} bytes"
    assert peers(friend)[home]["path"] == "punched"
    assert reach(friend)["punched"] == [home]  # what friend's status says
    mapped = reach(lab.home)["udp_port"]  # home's: where friends punch to
    assert mapped == {"address": lab.router_external_ip, "port": 8088}, mapped
    assert f"punch to {lab.router_external_ip}:8088" in cli(lab.home, "status")
    print(f"\ncone/cone: punched; 2 x 20 MiB in {took:.2f} s, the relay carried "
          f"{carried} bytes")


@pytest.mark.parametrize(("home_nat", "friend_nat"), [("symmetric", "cone"),
                                                      ("cone", "symmetric")])
def test_a_symmetric_nat_against_a_cone_punches_with_the_spread(
        pair: Callable[..., tuple[NatLab, Host, str, str]], home_nat: str,
        friend_nat: str) -> None:
    """One side's NAT maps each destination to a new random port: plain punch packets miss
    it, the spread (many sockets on one side, many ports on the other) meets it. (Home
    trusts friend: a host spreads for friends only.)"""
    lab, friend, home, _ = pair(home_nat, friend_nat, trusted=True)
    started = time.monotonic()
    specs = json.loads(cli(friend, "specs", home, "--json"))
    took = time.monotonic() - started
    assert specs["cpu"]["cores"] >= 1
    entry = remembered(friend, home)
    assert entry["path"] == "punched", entry
    assert str(entry["why"]).startswith(lab.router_external_ip + ":"), entry
    assert peers(friend)[home]["path"] == "punched"
    print(f"\n{home_nat}/{friend_nat}: punched at {entry['why']}; the command took "
          f"{took:.2f} s")


@pytest.mark.parametrize(("home_nat", "friend_nat"), [("cone", "udp-dropped"),
                                                      ("udp-dropped", "cone"),
                                                      ("symmetric", "symmetric"),
                                                      # no spread for a stranger
                                                      ("cone", "symmetric")])
def test_a_pair_that_cannot_punch_falls_back_to_the_relay_fast_and_remembers(
        pair: Callable[..., tuple[NatLab, Host, str, str]], home_nat: str,
        friend_nat: str) -> None:
    lab, friend, home, relay = pair(home_nat, friend_nat)
    started = time.monotonic()
    specs = json.loads(cli(friend, "specs", home, "--json"))
    first = time.monotonic() - started
    assert specs["cpu"]["cores"] >= 1
    entry = remembered(friend, home)
    assert entry["path"] == "relay", entry
    assert entry["why"], entry  # why it could not punch, to show the user
    row = peers(friend)[home]
    assert (row["path"], row["address"]) == ("relay", f"relay {relay}")
    # Remembered: the next command goes through the relay at once, with no new try.
    started = time.monotonic()
    cli(friend, "specs", home, "--json")
    again = time.monotonic() - started
    assert remembered(friend, home)["at"] == entry["at"]
    print(f"\n{home_nat}/{friend_nat}: relay; first command {first:.2f} s (with the try), "
          f"the next {again:.2f} s; why: {entry['why']}")
    assert first - again < FALLBACK_SECONDS + 1.0  # the try's cost, with room for CI
