"""Signed requests: the checks in isolation, then through the real app and a real server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import falcon
import pytest
from falcon import testing
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BUILTINS, start_server, web
from p2prc_core import hookimpl
from p2prc_core.config import Settings
from p2prc_core.identity import NodeIdentity, b64encode
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.server import create_app
from p2prc_core.services import NodeServices
from p2prc_core.signing import SignatureError, check_signature, sign_request
from p2prc_core.trust import ServerState, TrustStore

CALLER = NodeIdentity.generate()
OTHER = NodeIdentity.generate()
HOST = NodeIdentity.generate().node_id  # the node the unit tests' requests are for


def check(headers: dict[str, str], method: str = "POST", path: str = "/v1/x",
          query: str = "a=1", body: bytes = b"{}", now: float | None = None) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    return check_signature(lambda name: lower.get(name.lower()), method, path, query, body,
                           60, HOST, now).node_id


def test_a_signed_request_verifies() -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "a=1", b"{}", HOST)
    assert check(headers) == CALLER.node_id


@pytest.mark.parametrize("changed, title", [
    ({"body": b'{"ports": 9}'}, "Invalid signature"),
    ({"path": "/v1/y"}, "Invalid signature"),
    ({"query": "a=2"}, "Invalid signature"),
    ({"method": "DELETE"}, "Invalid signature"),
    ({"now": 120}, "Signature expired"),
    ({"now": -120}, "Signature expired"),
])
def test_tampered_or_stale_requests_are_rejected(changed: dict[str, Any], title: str) -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "a=1", b"{}", HOST)
    if "now" in changed:  # an offset from the time of signing
        changed = {"now": time.time() + changed["now"]}
    with pytest.raises(SignatureError) as caught:
        check(headers, **changed)
    assert caught.value.title == title


def test_wrong_key_is_rejected() -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "a=1", b"{}", HOST)
    headers["X-P2PRC-Key"] = b64encode(OTHER.public_key)
    with pytest.raises(SignatureError, match="does not belong"):
        check(headers)
    # Signed by another key but claiming the caller's id and key: the signature fails.
    forged = sign_request(OTHER, "POST", "/v1/x", "a=1", b"{}", HOST)
    forged.update({"X-P2PRC-Node": CALLER.node_id,
                   "X-P2PRC-Key": b64encode(CALLER.public_key)})
    with pytest.raises(SignatureError, match="does not match"):
        check(forged)


def test_a_request_signed_for_another_node_is_rejected() -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "a=1", b"{}", OTHER.node_id)
    with pytest.raises(SignatureError, match=f"signed for node '{OTHER.node_id}'") as caught:
        check(headers)
    assert caught.value.title == "Signed for another node"
    # Claiming this node as the target without re-signing breaks the signature.
    headers["X-P2PRC-Target"] = HOST
    with pytest.raises(SignatureError, match="does not match"):
        check(headers)


def test_missing_headers_are_named() -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "a=1", b"{}", HOST)
    del headers["X-P2PRC-Nonce"]
    with pytest.raises(SignatureError, match="missing X-P2PRC-Nonce"):
        check(headers)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["GET", "POST", "DELETE"]), st.text(min_size=1, max_size=30),
       st.text(max_size=30), st.binary(max_size=200))
def test_signing_then_checking_always_holds(method: str, path: str, query: str,
                                            body: bytes) -> None:
    headers = sign_request(CALLER, method, path, query, body, HOST)
    assert check(headers, method, path, query, body) == CALLER.node_id


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=100), st.data())
def test_any_changed_byte_of_a_body_is_rejected(body: bytes, data: st.DataObject) -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "", body, HOST)
    index = data.draw(st.integers(0, len(body) - 1))
    changed = bytearray(body)
    changed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SignatureError):
        check(headers, "POST", "/v1/x", "", bytes(changed))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_changed_byte_of_a_signature_header_is_rejected(data: st.DataObject) -> None:
    headers = sign_request(CALLER, "POST", "/v1/x", "q=1", b"body", HOST)
    name = data.draw(st.sampled_from(sorted(headers)))
    value = bytearray(headers[name].encode())
    index = data.draw(st.integers(0, len(value) - 1))
    value[index] = data.draw(st.sampled_from(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
                             .filter(lambda b: b != value[index]))
    headers[name] = value.decode()
    with pytest.raises(SignatureError):
        check(headers, "POST", "/v1/x", "q=1", b"body")


# -- through the app ---------------------------------------------------------------------

class WorkRoute:
    """A route that only trusted nodes may call, as container routes are."""

    @hookimpl
    def p2prc_add_routes(self, app: falcon.App) -> None:
        class Work:
            AUTH = {"post": "trusted"}

            def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
                """Start some work."""
                from p2prc_core.server.bodies import read_json
                resp.media = {"caller": req.context.caller, "got": read_json(req)}

        app.add_route("/v1/work", Work())


class NodeClient(testing.TestClient):
    """A test client of one node's app, knowing that node's id (what requests are for)."""

    node_id: str


def make_client(home: Path, **options: Any) -> NodeClient:
    hooks = make_plugin_manager(load_entrypoints=False, plugins=[*BUILTINS, ("w", WorkRoute())])
    node = NodeServices(Settings(**options), home, hooks)
    client = NodeClient(create_app(node))
    client.node_id = node.identity.node_id
    return client


def node_of(home: Path) -> str:
    return NodeIdentity.load_or_create(home).node_id


def signed(client: NodeClient, identity: NodeIdentity, body: Any,
           path: str = "/v1/work", now: float | None = None,
           headers: dict[str, str] | None = None, raw: bytes | None = None,
           target: str | None = None) -> testing.Result:
    """A request signed for the app's node (or ``target``)."""
    payload = raw if raw is not None else json.dumps(body).encode()
    target = target or client.node_id
    signature = sign_request(identity, "POST", path, "", json.dumps(body).encode(), target, now)
    return client.simulate_post(path, body=payload,
                                headers={**signature, "Content-Type": "application/json",
                                         **(headers or {})})


def test_untrusted_caller_gets_403_that_says_what_to_do(tmp_path: Path) -> None:
    result = signed(make_client(tmp_path), CALLER, {"n": 1})
    assert result.status_code == 403
    assert f"p2prc trust {CALLER.node_id}" in result.json["description"]


def test_trusted_caller_gets_through(tmp_path: Path) -> None:
    TrustStore(tmp_path).add(CALLER.node_id, "friend")
    result = signed(make_client(tmp_path), CALLER, {"n": 1})
    assert result.status_code == 200
    assert result.json == {"caller": CALLER.node_id, "got": {"n": 1}}


def test_untrust_takes_effect_on_the_running_app(tmp_path: Path) -> None:
    client = make_client(tmp_path)
    store = TrustStore(tmp_path)
    store.add(CALLER.node_id)
    assert signed(client, CALLER, {}).status_code == 200
    store.remove(CALLER.node_id)
    assert signed(client, CALLER, {}).status_code == 403


def test_open_mode_lets_any_signed_caller_in_but_not_unsigned(tmp_path: Path) -> None:
    client = make_client(tmp_path, trust_mode="open")
    assert signed(client, OTHER, {"n": 2}).status_code == 200
    unsigned = client.simulate_post("/v1/work", json={"n": 2})
    assert unsigned.status_code == 401 and "must be signed" in unsigned.json["description"]


def test_unsigned_tampered_stale_and_replayed_get_401(tmp_path: Path) -> None:
    TrustStore(tmp_path).add(CALLER.node_id)
    client = make_client(tmp_path)
    unsigned = client.simulate_post("/v1/work", json={})
    assert unsigned.status_code == 401 and unsigned.headers["www-authenticate"]
    tampered = signed(client, CALLER, {"ports": 1}, raw=b'{"ports": 99}')
    assert tampered.status_code == 401 and tampered.json["title"] == "Invalid signature"
    stale = signed(client, CALLER, {}, now=time.time() - 3600)
    assert stale.status_code == 401 and "clocks" in stale.json["description"]
    wrong = signed(client, CALLER, {}, headers={"X-P2PRC-Key": b64encode(OTHER.public_key)})
    assert wrong.status_code == 401 and wrong.json["title"] == "Wrong key"
    body = json.dumps({}).encode()
    headers = {**sign_request(CALLER, "POST", "/v1/work", "", body, node_of(tmp_path)),
               "Content-Type": "application/json"}
    assert client.simulate_post("/v1/work", body=body, headers=headers).status_code == 200
    replay = client.simulate_post("/v1/work", body=body, headers=headers)
    assert replay.status_code == 401 and replay.json["title"] == "Replayed request"
    # ... also after a restart: a new app on the same home remembers the nonce.
    again = make_client(tmp_path).simulate_post("/v1/work", body=body, headers=headers)
    assert again.status_code == 401 and again.json["title"] == "Replayed request"


def test_signed_body_over_the_cap_is_413(tmp_path: Path) -> None:
    TrustStore(tmp_path).add(CALLER.node_id)
    result = signed(make_client(tmp_path, max_body_bytes=100), CALLER, {"x": "y" * 200})
    assert result.status_code == 413


def test_nonce_store_expires_old_nonces(tmp_path: Path) -> None:
    state = ServerState(tmp_path)
    start = time.time()
    assert state.use_nonce(CALLER.node_id, "n" * 20, keep_seconds=10, now=start)
    assert not state.use_nonce(CALLER.node_id, "n" * 20, keep_seconds=10, now=start + 9)
    assert state.use_nonce(OTHER.node_id, "n" * 20, keep_seconds=10, now=start + 9)
    # Outside the window the timestamp check refuses it anyway; the store may forget it.
    assert state.use_nonce(CALLER.node_id, "n" * 20, keep_seconds=10, now=start + 11)


# -- real server processes sharing one home ------------------------------------------------

@pytest.mark.integration
def test_replay_is_refused_across_processes_and_a_restart(tmp_path: Path) -> None:
    """Two gunicorn masters on one home stand for any two workers: they share only files."""
    home = tmp_path / "server"
    first = start_server(home)
    # A second server for a home is refused (server.json names the first); this test wants
    # one on purpose, to stand for another worker, so it takes that file away.
    (home / "server.json").unlink()
    second = start_server(home, env={"P2PRC_WORKERS": "2"})
    headers = sign_request(CALLER, "GET", "/v1/trust/me", "", b"", node_of(home))
    try:
        answer = web.get(first.url() + "/v1/trust/me", headers=headers, timeout=5)
        assert answer.status_code == 200 and answer.json()["trusted"] is False
        for server in (second, first, second):
            again = web.get(server.url() + "/v1/trust/me", headers=headers, timeout=5)
            assert again.status_code == 401 and again.json()["title"] == "Replayed request"
    finally:
        second.stop()
    assert first.stop() == 0
    restarted = start_server(home, port=first.port)
    try:
        replay = web.get(restarted.url() + "/v1/trust/me", headers=headers, timeout=5)
        assert replay.status_code == 401
        fresh = sign_request(CALLER, "GET", "/v1/trust/me", "", b"", node_of(home))
        assert web.get(restarted.url() + "/v1/trust/me", headers=fresh,
                         timeout=5).status_code == 200
    finally:
        restarted.stop()
