"""Names, not addresses: a friend who joins carries the name it suggests (the host's own
choice wins), what a joiner suggests is checked and cleaned, the dashboard renames and
untrusts, and the command line names hosts by name, saying the path only on a detail line."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from falcon import testing
from test_trust_cli import invite
from test_ui_access import HOST, board

from conftest import P2PRC, LiveServer, start_server, web
from p2prc_core import records
from p2prc_core.identity import NodeIdentity, canonical_json
from p2prc_core.names import PeerNames
from p2prc_core.peertable import PeerTable
from p2prc_core.signing import sign_request
from p2prc_core.trust import (
    ServerState,
    TrustError,
    TrustStore,
    accept_invite,
    suggested_name,
)
from p2prc_core.wire import JoinRequest, WireError, convert
from p2prc_ui import Dashboard, create_app

__all__ = ["board"]  # the dashboard fixture, used by name

HOSTILE = ["x" * 33, "bob\x1b[31m", "bob\nroot", "bob\n", "<b>bob</b>", "bob smith",
           "bob.lan", "-bob", "a" * 26, "\u202ebob", "b\u00f6b"]


def p2prc(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "P2PRC_HOME": str(home), **env})


def record(identity: NodeIdentity, name: str) -> dict[str, object]:
    return records.sign_record(identity, {
        "name": name, "addresses": ["2001:db8::7"], "port": 8088, "seq": 1,
        "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})


# -- what a joiner suggests ------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in HOSTILE if n != "a" * 26])  # that one: below
def test_a_hostile_suggested_name_is_refused_on_the_wire(name: str) -> None:
    with pytest.raises(WireError, match="a name is one word"):
        convert({"secret": "s", "name": name}, JoinRequest)
    assert convert({"secret": "s", "name": "bob_2-x"}, JoinRequest).name == "bob_2-x"
    assert convert({"secret": "s"}, JoinRequest).name == ""  # an older joiner


def test_a_record_name_is_cleaned_never_kept_raw(tmp_path: Path) -> None:
    state, store, table = ServerState(tmp_path), TrustStore(tmp_path), PeerTable(tmp_path)
    for raw, kept in (("<b>Bob's laptop</b>\x1b[2J", "bBobs-laptopb"), ("\u202e\x07", ""),
                      ("J\u00f6rg.home", "Jorg-home")):
        joiner = NodeIdentity.generate()
        secret, _ = state.create_invite(60)
        assert accept_invite(state, store, table, joiner.node_id, secret,
                             record(joiner, raw)) == kept
        assert store.all()[joiner.node_id].name == kept
    assert suggested_name("x" * 80) == "x" * 32 and suggested_name(7) == ""
    assert suggested_name("a" * 26) == ""  # a name may not read as a node id
    joiner = NodeIdentity.generate()
    secret, _ = state.create_invite(60)
    assert accept_invite(state, store, table, joiner.node_id, secret, None, "a" * 26) == ""


def test_a_suggestion_never_takes_a_name_the_host_gave(tmp_path: Path) -> None:
    state, store, table = ServerState(tmp_path), TrustStore(tmp_path), PeerTable(tmp_path)
    bob, impostor, named, carol = (NodeIdentity.generate() for _ in range(4))
    store.add(bob.node_id, name="bob")
    # a clash with another trusted name (letter case aside) gets a number
    secret, _ = state.create_invite(60)
    assert accept_invite(state, store, table, impostor.node_id, secret, None, "BOB") == "BOB-2"
    # a node the host named already keeps that name
    store.add(named.node_id, name="dave")
    secret, _ = state.create_invite(60)
    assert accept_invite(state, store, table, named.node_id, secret, None, "eve") == "dave"
    # the invite's name wins over the joiner's suggestion
    secret, _ = state.create_invite(60, name="carol")
    assert accept_invite(state, store, table, carol.node_id, secret, None, "mallory") == "carol"
    assert store.names()[carol.node_id] == "carol" and store.names()[bob.node_id] == "bob"


def test_the_users_own_names_keep_the_rule(tmp_path: Path) -> None:
    store, friend = TrustStore(tmp_path), NodeIdentity.generate().node_id
    store.add(friend, name="bob")
    for bad in (n for n in HOSTILE if n != "bob\n"):  # what the user typed is stripped
        with pytest.raises(TrustError, match="cannot be a name"):
            store.users_name("x" * 26, bad)
    with pytest.raises(TrustError, match="already names another node"):
        store.users_name(NodeIdentity.generate().node_id, "Bob")
    assert store.users_name(friend, " bob ") == "bob"  # its own name


def test_a_hostile_name_sent_to_a_server_is_refused_and_the_invite_kept(
        live_server: LiveServer) -> None:
    caller = NodeIdentity.generate()
    secret, _ = ServerState(live_server.home).create_invite(60)
    for name in ("<script>x</script>", "a\x1bb", "x" * 40):
        body = canonical_json({"secret": secret, "name": name})
        headers = sign_request(caller, "POST", "/v1/trust/join", "", body, live_server.node_id)
        reply = web.post(live_server.url() + "/v1/trust/join", content=body,
                         headers={**headers, "Content-Type": "application/json"}, timeout=5)
        assert reply.status_code == 400 and "a name is one word" in reply.text
    assert not TrustStore(live_server.home).is_trusted(caller.node_id)
    assert ServerState(live_server.home).invites()[0]["used_by"] is None


# -- joining with a name, end to end ---------------------------------------------------------

@pytest.mark.integration
def test_a_client_only_friend_joins_under_its_own_name(live_server: LiveServer,
                                                       tmp_path: Path) -> None:
    """The friend runs no server, so sends no record: its name still comes along."""
    friend, other, third = tmp_path / "friend", tmp_path / "other", tmp_path / "third"
    friend_id = p2prc(friend, "id").stdout.strip()
    joined = p2prc(friend, "join", invite(live_server), P2PRC_NAME="Bob's laptop")
    assert joined.returncode == 0, joined.stderr
    assert TrustStore(live_server.home).names()[friend_id] == "Bobs-laptop"
    listed = p2prc(live_server.home, "trust").stdout
    assert "Bobs-laptop" in listed
    # --as suggests a name; an invite's --name wins over it
    other_id = p2prc(other, "id").stdout.strip()
    assert p2prc(other, "join", invite(live_server), "--as", "olga").returncode == 0
    third_id = p2prc(third, "id").stdout.strip()
    token = invite(live_server, "--name", "carol")
    assert p2prc(third, "join", token, "--as", "mallory").returncode == 0
    names = TrustStore(live_server.home).names()
    assert names[other_id] == "olga" and names[third_id] == "carol"
    bad = p2prc(third, "join", token, "--as", "<b>")
    assert bad.returncode == 1 and "cannot be a name" in bad.stderr
    taken = p2prc(live_server.home, "invite", "--name", "olga")
    assert taken.returncode == 1 and "already names another node" in taken.stderr


# -- the dashboard: rename and untrust -------------------------------------------------------

def post(board: Dashboard, action: str, body: str, csrf: bool = True) -> testing.Result:
    headers = {"Cookie": f"{board.cookie}={board.token}", "Origin": f"http://{HOST}",
               "Content-Type": "application/x-www-form-urlencoded"}
    return testing.TestClient(create_app(board), headers={"Host": HOST}).simulate_post(
        action, body=body + (f"&csrf={board.csrf}" if csrf else ""), headers=headers)


def shown(board: Dashboard, location: str) -> str:
    return testing.TestClient(create_app(board), headers={"Host": HOST}).simulate_get(
        location, headers={"Cookie": f"{board.cookie}={board.token}"}).text


def test_the_dashboard_renames_and_untrusts(board: Dashboard) -> None:
    store = board.services.trust
    friend, other = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    store.add(friend, name="bob")
    store.add(other, name="olga")
    page = shown(board, "/host")
    assert 'action="/host/rename"' in page and 'action="/host/untrust"' in page
    # the dashboard's rules: no CSRF token, nothing done
    assert post(board, "/host/rename", f"id={friend}&name=robert", csrf=False).status_code \
        == 403
    done = post(board, "/host/rename", f"id={friend}&name=robert")
    assert done.status_code == 303 and store.names()[friend] == "robert"
    assert "is now named robert" in shown(board, done.headers["Location"])
    for bad in ("%3Cb%3Ex%3C%2Fb%3E", "a%1Bb", "olga"):  # markup, control, another's
        refused = post(board, "/host/rename", f"id={friend}&name={bad}")
        assert "Could not rename" in shown(board, refused.headers["Location"])
    assert store.names()[friend] == "robert"
    unknown = post(board, "/host/rename", f"id={'z' * 26}&name=zed")
    assert "is not trusted here" in shown(board, unknown.headers["Location"])
    # untrust asks first (without JavaScript), then does it
    asked = post(board, "/host/untrust", f"id={friend}")
    assert asked.status_code == 200 and "Stop trusting robert?" in asked.text
    assert store.is_trusted(friend)
    gone = post(board, "/host/untrust", f"id={friend}&confirmed=1")
    assert "robert is no longer trusted here" in shown(board, gone.headers["Location"])
    assert not store.is_trusted(friend) and store.is_trusted(other)


def test_an_invite_made_on_the_dashboard_binds_a_name(board: Dashboard) -> None:
    made = post(board, "/host/invite", "ttl=1h&address=127.0.0.1&name=carol")
    assert made.status_code == 303
    invites = board.services.state.invites()
    assert len(invites) == 1
    caller = NodeIdentity.generate()
    note = shown(board, made.headers["Location"])
    token = note.split("p2prc-invite-", 1)[1].split("<", 1)[0].split('"', 1)[0]
    from p2prc_core.trust import Invite

    secret = Invite.parse("p2prc-invite-" + token).secret
    assert board.services.invites.accept(caller.node_id, JoinRequest(
        secret=secret, name="mallory")).trusted
    assert board.services.trust.names()[caller.node_id] == "carol"


# -- the command line names hosts ------------------------------------------------------------

def test_a_relayed_path_names_the_relay_by_name(tmp_path: Path) -> None:
    table, store = PeerTable(tmp_path, allow_loopback=True), TrustStore(tmp_path)
    names = PeerNames(table, store)
    relay, host = NodeIdentity.generate(), NodeIdentity.generate()
    table.merge([record(relay, "hub"), record(host, "alice\x1b[2J")])
    path = f"relay {relay.node_id}@[fd00::2]:8088"
    assert names.path_text(path, host.node_id) == "through relay hub"
    assert names.path_text("[fd77::1]:8088", host.node_id) == "at [fd77::1]:8088"
    assert names.label(host.node_id, path) == "alice"  # what it says, made safe
    store.add(host.node_id, name="al")  # the user's own name wins
    assert names.label(host.node_id, path) == "al"
    assert names.label(None, "[fd77::1]:8088") == "[fd77::1]:8088"
    assert names.label(NodeIdentity.generate().node_id, "x") != "x"  # the id, not the path


def test_specs_is_headed_by_the_peers_name(tmp_path: Path) -> None:
    server = start_server(tmp_path / "alice", env={"P2PRC_NAME": "alice"})
    try:
        me = tmp_path / "me"
        assert p2prc(me, "peers", "add", server.peer()).returncode == 0
        shown = p2prc(me, "specs", "alice")
        assert shown.returncode == 0, shown.stderr
        head = shown.stdout.splitlines()[:3]
        assert any("alice" in line for line in head), shown.stdout
        assert server.peer() not in shown.stdout
        server.stop()  # an error names the peer asked first, whatever address failed
        failed = p2prc(me, "specs", "alice")
        assert failed.returncode == 1 and failed.stderr.startswith("Error: alice: "), \
            failed.stderr
    finally:
        server.stop()


@pytest.mark.docker
@pytest.mark.integration
def test_container_lines_name_the_host(tmp_path: Path, friend: LiveServer) -> None:
    me = tmp_path / "me"
    assert p2prc(me, "peers", "add", friend.peer()).returncode == 0
    touched = p2prc(me, "touch", "alice")
    assert touched.returncode == 0, touched.stderr
    first, second = touched.stdout.splitlines()[:2]
    assert first.startswith("container ") and " on alice, until " in first, first
    assert second == f"  reached at {friend.peer()}"  # the path, on a detail line
    container = first.split()[1]
    listed = p2prc(me, "containers", "ls")
    row = next(line for line in listed.stdout.splitlines() if container in line)
    assert "alice" in row and friend.peer() not in row
    assert json.loads(p2prc(me, "containers", "ls", "--json").stdout)[0]["peer"] == "alice"
    removed = p2prc(me, "rm", container)
    assert removed.stdout.strip() == f"removed {container} from alice", removed.stdout


def test_a_suggestion_never_shadows_a_name_the_user_gave_a_peer(tmp_path: Path) -> None:
    """The user called a peer of the table 'alice' (peers add --name): a joiner suggesting
    'alice' is trusted as 'alice-2', so 'alice' keeps naming the user's alice everywhere."""
    state, store = ServerState(tmp_path), TrustStore(tmp_path)
    table = PeerTable(tmp_path, allow_loopback=True)
    alice, joiner = NodeIdentity.generate(), NodeIdentity.generate()
    table.merge([record(alice, "whatever")])
    table.name(alice.node_id, "alice")
    secret, _ = state.create_invite(60)
    assert accept_invite(state, store, table, joiner.node_id, secret, None,
                         "alice") == "alice-2"
    assert PeerNames(table, store).node_id_of("alice") == alice.node_id


def test_a_name_stored_before_names_were_checked_is_shown_safely(tmp_path: Path) -> None:
    table, store = PeerTable(tmp_path), TrustStore(tmp_path)
    old = NodeIdentity.generate()
    store.add(old.node_id, name="\x1b]0;pwned\x07\x1b[2Jmallory")
    shown = PeerNames(table, store).label(old.node_id)
    assert "\x1b" not in shown and "\x07" not in shown and "mallory" in shown
