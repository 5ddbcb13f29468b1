"""p2prc id, trust, untrust, invite and join, against real server processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import P2PRC, LiveServer, web
from p2prc_core.identity import NodeIdentity
from p2prc_core.signing import sign_request
from p2prc_core.trust import Invite, ServerState, TrustStore


def p2prc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "P2PRC_HOME": str(home)})


def test_id_creates_the_key_once(tmp_path: Path) -> None:
    first = p2prc(tmp_path, "id")
    assert first.returncode == 0
    node_id = first.stdout.strip()
    assert p2prc(tmp_path, "id").stdout.strip() == node_id
    data = json.loads(p2prc(tmp_path, "id", "--json").stdout)
    assert data["node_id"] == node_id and data["public_key"]
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600


def test_trust_untrust_and_list(tmp_path: Path) -> None:
    friend = NodeIdentity.generate().node_id
    assert "No node is trusted" in p2prc(tmp_path, "trust").stdout
    assert p2prc(tmp_path, "trust", friend, "--name", "bob").returncode == 0
    assert "already trusted" in p2prc(tmp_path, "trust", friend).stdout
    listed = json.loads(p2prc(tmp_path, "trust", "--json").stdout)
    assert listed[friend]["name"] == "bob" and listed[friend]["via"] == "trust"
    renamed = p2prc(tmp_path, "trust", friend, "--name", "robert")  # a rename, not dropped
    assert "now named 'robert'" in renamed.stdout
    assert json.loads(p2prc(tmp_path, "trust", "--json").stdout)[friend]["name"] == "robert"
    assert friend in p2prc(tmp_path, "trust").stdout
    assert p2prc(tmp_path, "untrust", friend).returncode == 0
    again = p2prc(tmp_path, "untrust", friend)
    assert again.returncode == 1 and "was not trusted" in again.stderr
    bad = p2prc(tmp_path, "trust", "not-a-node")
    assert bad.returncode == 1 and "no node is known as 'not-a-node'" in bad.stderr


def test_trust_on_a_running_server_takes_effect_at_once(live_server: LiveServer,
                                                        tmp_path: Path) -> None:
    caller = NodeIdentity.generate()

    def trusted() -> bool:
        headers = sign_request(caller, "GET", "/v1/trust/me", "", b"", live_server.node_id)
        reply = web.get(live_server.url() + "/v1/trust/me", headers=headers, timeout=5)
        result: bool = reply.json()["trusted"]
        return result

    assert trusted() is False
    assert p2prc(live_server.home, "trust", caller.node_id).returncode == 0
    assert trusted() is True
    assert p2prc(live_server.home, "untrust", caller.node_id).returncode == 0
    assert trusted() is False


def invite(server: LiveServer, *extra: str) -> str:
    result = p2prc(server.home, "invite", "--address", "127.0.0.1", "--port",
                   str(server.port), *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.integration
def test_invite_then_join_trusts_both_ways(live_server: LiveServer, tmp_path: Path) -> None:
    friend = tmp_path / "friend"
    host_id = p2prc(live_server.home, "id").stdout.strip()
    friend_id = p2prc(friend, "id").stdout.strip()
    token = invite(live_server)

    joined = p2prc(friend, "join", token, "--json")
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["joined"] == host_id

    # The friend is on the host's allowlist, and says so when it asks.
    trusted = TrustStore(live_server.home).all()
    assert trusted[friend_id].via == "invite"
    identity = NodeIdentity.load_or_create(friend)
    headers = sign_request(identity, "GET", "/v1/trust/me", "", b"", live_server.node_id)
    me = web.get(live_server.url() + "/v1/trust/me", headers=headers, timeout=5).json()
    assert me == {"node_id": friend_id, "trusted": True, "trust_mode": "allowlist"}
    # The host is in the friend's table. The friend runs no server: it is not in the
    # host's, where it would only be dialled in vain (a friend with a server is; below).
    friend_table = json.loads((friend / "peers.json").read_text())["peers"]
    assert list(friend_table) == [host_id]
    assert friend_table[host_id]["record"]["port"] == live_server.port
    host_table = json.loads((live_server.home / "peers.json").read_text())["peers"]
    assert friend_id not in host_table

    # An invite works once.
    second = p2prc(tmp_path / "eve", "join", token)
    assert second.returncode == 1 and "already used" in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.integration
def test_expired_invite_is_refused(live_server: LiveServer, tmp_path: Path) -> None:
    token = invite(live_server, "--ttl", "1s")
    while time.time() <= Invite.parse(token).expires:  # wait until it has run out
        time.sleep(0.05)
    local = p2prc(tmp_path / "friend", "join", token)
    assert local.returncode == 1 and "expired" in local.stderr
    # The host refuses it too, even when the token claims a later expiry.
    offer = Invite.parse(token)
    stretched = Invite(offer.node_id, offer.addresses, offer.port, offer.secret,
                       int(time.time()) + 3600).token()
    remote = p2prc(tmp_path / "friend", "join", stretched)
    assert remote.returncode == 1 and "refused (403)" in remote.stderr
    assert "expired" in remote.stderr


@pytest.mark.integration
def test_invite_pointing_at_another_node_is_not_joined(live_server: LiveServer,
                                                       tmp_path: Path) -> None:
    real = Invite.parse(invite(live_server))
    impostor = NodeIdentity.generate().node_id
    forged = Invite(impostor, real.addresses, real.port, real.secret, real.expires).token()
    result = p2prc(tmp_path / "friend", "join", forged)
    assert result.returncode == 1 and "is not the node the invite names" in result.stderr
    assert not (tmp_path / "friend" / "peers.json").exists()


def test_damaged_and_unknown_tokens(tmp_path: Path) -> None:
    damaged = p2prc(tmp_path, "join", "p2prc-invite-AAAA")
    assert damaged.returncode == 1 and "damaged" in damaged.stderr
    wrong = p2prc(tmp_path, "join", "hello")
    assert wrong.returncode == 1 and "not an invite token" in wrong.stderr


@pytest.mark.integration
def test_unknown_secret_is_refused(live_server: LiveServer, tmp_path: Path) -> None:
    real = Invite.parse(invite(live_server))
    guessed = Invite(real.node_id, real.addresses, real.port, "guessed-secret-000000000",
                     real.expires).token()
    result = p2prc(tmp_path / "friend", "join", guessed)
    assert result.returncode == 1 and "not known here" in result.stderr


def _redeem(args: tuple[str, str, str]) -> str:
    home, secret, caller = args
    try:
        ServerState(Path(home)).redeem_invite(secret, caller)
        return "ok"
    except Exception as err:  # noqa: BLE001 - the message is the result
        return str(err)


def test_invites_are_one_time_under_concurrent_redeems(tmp_path: Path) -> None:
    import multiprocessing

    state = ServerState(tmp_path)
    secret, _ = state.create_invite(60)
    callers = [letter * 26 for letter in "abcdefgh"]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        outcomes = pool.map(_redeem, [(str(tmp_path), secret, c) for c in callers])
    assert outcomes.count("ok") == 1
    assert all("already used" in o for o in outcomes if o != "ok")
    assert state.invites()[0]["used_by"] == callers[outcomes.index("ok")]


def test_invite_carries_the_advertised_addresses(tmp_path: Path) -> None:
    """Behind NAT, advertise_addresses names the public address: invites carry it too."""
    result = subprocess.run([P2PRC, "invite", "--json"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "P2PRC_HOME": str(tmp_path),
                                             "P2PRC_ADVERTISE_ADDRESSES": "203.0.113.7,2001:db8::7",
                                             "P2PRC_ADVERTISE_PORT": "9999"})
    assert result.returncode == 0, result.stderr
    offer = Invite.parse(json.loads(result.stdout)["token"])
    assert offer.addresses == ["203.0.113.7", "2001:db8::7"] and offer.port == 9999


def test_nodes_are_named_by_name_or_id_prefix_and_unknown_names_get_a_hint(
        tmp_path: Path) -> None:
    friend = NodeIdentity.generate().node_id
    assert p2prc(tmp_path, "trust", friend, "--name", "bob").returncode == 0
    # untrust by the name trust lists, and by a unique start of the id
    gone = p2prc(tmp_path, "untrust", "bob")
    assert gone.returncode == 0 and friend in gone.stdout, gone.stderr
    assert p2prc(tmp_path, "trust", friend, "--name", "bob").returncode == 0
    assert p2prc(tmp_path, "untrust", friend[:6]).returncode == 0
    assert friend not in p2prc(tmp_path, "trust").stdout
    # a name nobody has: said so, with the nearest one
    assert p2prc(tmp_path, "trust", friend, "--name", "alice").returncode == 0
    wrong = p2prc(tmp_path, "untrust", "alcie")
    assert wrong.returncode == 1 and "did you mean 'alice'?" in wrong.stderr
    peer = p2prc(tmp_path, "specs", "alcie")
    assert peer.returncode == 1 and "no peer is named 'alcie'" in peer.stderr
    assert "name resolution" not in peer.stderr and "Traceback" not in peer.stderr
