"""Every answer a peer gives has one typed definition (``p2prc_core.wire``): the server writes
it with that definition, the OpenAPI document points at it, and the client decodes the bytes
into it in one pass. The container request is built once, from keywords, and checked before
anything is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from falcon import testing

from conftest import BUILTINS
from p2prc_core.config import Settings
from p2prc_core.discovery import handle_exchange
from p2prc_core.errors import PeerError, Refusal
from p2prc_core.models import Endpoint
from p2prc_core.my_containers import RemoteContainer
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.server import create_app
from p2prc_core.services import NodeServices
from p2prc_core.wire import (
    ContainerRequest,
    ExchangeAnswer,
    Health,
    JoinAnswer,
    ReachAnswer,
    SshLogin,
    WireError,
    decode,
    to_builtins,
)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0w6nHbH0Fo5L3mO0r4DhV0q1wJm7o3pQ2g5bJk9x1f"
ENDPOINT = Endpoint("fd42::1", 8088)


@pytest.fixture
def services(tmp_path: Path) -> NodeServices:
    hooks = make_plugin_manager(load_entrypoints=False, plugins=BUILTINS)
    return NodeServices(Settings(name="unit"), tmp_path, hooks)


def reply_bytes(**changes: Any) -> bytes:
    container_id = "c" * 64
    good = {"id": container_id, "image": "p2prc/base:latest", "created": 1, "expires": 2,
            "ports": [{"name": "ssh", "internal": 22, "external": 42000}],
            "ssh": to_builtins(SshLogin.of(container_id, "fd42::1", 42000, HOST_KEY, False))}
    return json.dumps({**good, **changes}).encode()


def test_the_document_points_each_answer_at_its_definition(services: NodeServices) -> None:
    document = testing.TestClient(create_app(services)).simulate_get("/v1/openapi.json").json
    expected = {("/v1/health", "get", "200"): "Health",
                ("/v1/trust/me", "get", "200"): "TrustMe",
                ("/v1/trust/join", "post", "200"): "JoinAnswer",
                ("/v1/reach", "post", "200"): "ReachAnswer",
                ("/v1/relay/wait", "get", "200"): "RelayWait",
                ("/v1/containers", "post", "201"): "ContainerReply",
                ("/v1/peers", "get", "200"): "ExchangeAnswer"}
    for (path, method, status), name in expected.items():
        answer = document["paths"][path][method]["responses"][status]
        assert answer["content"]["application/json"]["schema"] == \
            {"$ref": f"#/components/schemas/{name}"}, path
        assert name in document["components"]["schemas"]


def test_health_is_written_by_its_definition(services: NodeServices) -> None:
    result = testing.TestClient(create_app(services)).simulate_get("/v1/health")
    health = decode(result.content, Health)
    assert health.status == "ok" and health.time is not None and health.time > 1e9
    assert result.headers["content-type"].startswith("application/json")


def test_the_server_answers_an_exchange_with_the_typed_answer(services: NodeServices) -> None:
    answer = handle_exchange(services.table, services.own.record(), {"since": None}, 50)
    assert isinstance(answer, ExchangeAnswer) and answer.node is not None
    client = testing.TestClient(create_app(services))
    first = client.simulate_get("/v1/peers")
    assert decode(first.content, ExchangeAnswer).node == services.own.record()
    assert first.headers["content-type"].startswith("application/json")
    again = client.simulate_get("/v1/peers", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.headers["etag"] == first.headers["etag"]


def test_a_create_is_decoded_from_its_bytes_in_one_pass() -> None:
    kept = RemoteContainer.from_reply(reply_bytes(), ENDPOINT, "n" * 26)
    assert kept.id == "c" * 64 and kept.ssh is not None and kept.node_id == "n" * 26
    for raw in (reply_bytes()[:-1] + b', "cpus": NaN}', b"[" * 40 + b"]" * 40,
                reply_bytes(ssh={"port": 42000, "host_key": HOST_KEY, "user": "admin"}),
                b"<html>not a node</html>"):
        with pytest.raises(PeerError, match="answered the create with something that is "
                                            "not a container"):
            RemoteContainer.from_reply(raw, ENDPOINT)


def test_a_reach_answer_is_safe_to_show_as_decoded() -> None:
    answer = decode(b'{"reachable": false, "address": "\\u001b[31m203.0.113.9:8088", '
                    b'"error": "refused\\u001b]0;owned\\u0007"}', ReachAnswer)
    assert "\x1b" not in answer.address and answer.address.endswith("203.0.113.9:8088")
    assert answer.error is not None and "\x1b" not in answer.error and "\x07" not in answer.error


def test_a_join_answer_without_a_record_or_nested_too_deep_is_refused() -> None:
    with pytest.raises(WireError):
        decode(b'{"trusted": true, "node": "me"}', JoinAnswer)
    deep: Any = {}
    for _ in range(40):
        deep = {"x": deep}
    with pytest.raises(WireError, match="deeper"):
        decode(json.dumps({"trusted": True, "node": deep}).encode(), JoinAnswer)


def test_the_container_request_is_built_once_with_the_key(services: NodeServices) -> None:
    request = services.on_peers.request(ports=2, gpu=[3, 1], memory=1 << 30, ttl=600)
    assert isinstance(request, ContainerRequest)
    assert request.ssh_key == services.on_peers.ssh_key()[1]
    assert (request.ports, request.gpu, request.memory, request.ttl, request.image) == \
        (2, (1, 3), 1 << 30, 600, None)
    assert msgspec.json.decode(msgspec.json.encode(request))["gpu"] == [1, 3]


@pytest.mark.parametrize("asked, words", [
    ({"gpu": [1, 1]}, "distinct GPU indexes"), ({"cpus": 0.001}, "cpus must be a number"),
    ({"image": "../../etc"}, "not a valid image"), ({"ports": -1}, "from 0 up")])
def test_a_malformed_request_is_refused_before_it_is_sent(
        services: NodeServices, monkeypatch: pytest.MonkeyPatch, asked: dict[str, Any],
        words: str) -> None:
    def no_peer(*args: object) -> None:
        raise AssertionError("a malformed request reached for a peer")

    monkeypatch.setattr(services.peers, "client", no_peer)
    with pytest.raises(Refusal, match=words):
        services.on_peers.touch("friend", **asked)
