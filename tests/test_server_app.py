"""The Falcon app through falcon.testing, with the real built-in plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import falcon
import pytest
from falcon import testing

from conftest import BUILTINS
from p2prc_core import __version__, hookimpl
from p2prc_core.config import Settings
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.server import create_app, openapi
from p2prc_core.server.bodies import read_json
from p2prc_core.services import NodeServices


class EchoRoute:
    """A plugin route that reads JSON through the core's capped reader."""

    @hookimpl
    def p2prc_add_routes(self, app: falcon.App) -> None:
        class Echo:
            OPENAPI = {"post": {"summary": "Echo a JSON body"}}

            def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
                resp.media = {"echo": read_json(req)}

        app.add_route("/v1/echo", Echo())


@pytest.fixture
def client(tmp_path: Path) -> testing.TestClient:
    settings = Settings(name="unit", max_body_bytes=1000, speedtest_max_bytes=10_000,
                        speedtest_default_bytes=3000)
    hooks = make_plugin_manager(load_entrypoints=False, plugins=[*BUILTINS, ("echo", EchoRoute())])
    return testing.TestClient(create_app(NodeServices(settings, tmp_path, hooks)))


def assert_json_error(result: testing.Result, status: int, title_words: str = "") -> None:
    assert result.status_code == status
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert body["title"] and body["description"], body
    assert title_words.lower() in (body["title"] + body["description"]).lower()


def test_health(client: testing.TestClient) -> None:
    body = client.simulate_get("/v1/health").json
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["uptime_seconds"] >= 0


ADVERTISED = ["2a00:1450:4001::5", "8.8.4.4", "fd42::5", "192.168.7.5"]


@pytest.mark.usefixtures("fake_interfaces")
def test_node_advertises_what_select_address_chose(client: testing.TestClient) -> None:
    body = client.simulate_get("/v1/node").json
    assert body["name"] == "unit" and body["port"] == 8088
    # Global IPv6, global IPv4, unique-local, private; never link-local; no loopback unless
    # allowed; an interface that vanished while it was read is skipped.
    assert body["addresses"] == ADVERTISED
    assert body["version"] == __version__


@pytest.mark.usefixtures("fake_interfaces")
def test_node_advertises_loopback_when_allowed(tmp_path: Path) -> None:
    hooks = make_plugin_manager(load_entrypoints=False, plugins=BUILTINS)
    context = NodeServices(Settings(allow_loopback=True), tmp_path, hooks)
    client = testing.TestClient(create_app(context))
    # Anything routable first, then IPv6 loopback before IPv4 loopback.
    assert client.simulate_get("/v1/node").json["addresses"] == [*ADVERTISED, "::1",
                                                                 "127.0.0.1"]


def test_specs_fields(client: testing.TestClient) -> None:
    specs = client.simulate_get("/v1/specs").json
    assert specs["hostname"]
    assert specs["os"]["system"] == "Linux"
    assert specs["cpu"]["model"] and specs["cpu"]["cores"] >= 1
    assert specs["cpu"]["threads"] >= specs["cpu"]["cores"]
    assert specs["memory"]["total"] > specs["memory"]["available"] > 0
    assert specs["disk"]["total"] >= specs["disk"]["free"] > 0
    assert set(specs["load"]) == {"1m", "5m", "15m"}
    # Whatever GPUs this machine has (none, or some): a list of them, never an error.
    assert isinstance(specs["gpus"], list)
    for gpu in specs["gpus"]:
        assert {"index", "name", "memory_total", "driver"} <= set(gpu)


class CountingGPUs:
    """A GPU plugin that says what it has, and counts how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def p2prc_collect_specs(self) -> dict[str, Any]:
        self.calls += 1
        return {"gpus": [{"index": 0, "name": "Fake H200", "memory_total": 141 << 30,
                          "driver": "580.0"}]}


def test_specs_are_collected_once_and_served_from_the_cache(tmp_path: Path) -> None:
    gpus = CountingGPUs()
    hooks = make_plugin_manager(load_entrypoints=False, plugins=[*BUILTINS, ("gpus", gpus)])
    settings = Settings(specs_cache_seconds=3600)
    client = testing.TestClient(create_app(NodeServices(settings, tmp_path, hooks)))
    for _ in range(20):
        specs = client.simulate_get("/v1/specs").json
        assert specs["gpus"][0]["name"] == "Fake H200"  # a third-party part wins a clash
    # Sampling (CPU use, GPUs) happens once per specs_cache_seconds, not per request.
    assert gpus.calls == 1


def test_download_streams_exactly_the_bytes_asked(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/speedtest/download", params={"bytes": "2500"})
    assert result.status_code == 200
    assert len(result.content) == 2500
    assert result.headers["content-length"] == "2500"
    assert result.headers["content-type"] == "application/octet-stream"
    assert len(client.simulate_get("/v1/speedtest/download").content) == 3000  # the default
    assert client.simulate_get("/v1/speedtest/download?bytes=0").content == b""


@pytest.mark.parametrize("value", ["-5", "ten", "1.5", "1e3", ""])
def test_download_bytes_must_be_a_whole_number(client: testing.TestClient, value: str) -> None:
    result = client.simulate_get("/v1/speedtest/download", query_string=f"bytes={value}")
    assert_json_error(result, 400, "whole number")


def test_download_over_the_cap_is_413(client: testing.TestClient) -> None:
    assert_json_error(client.simulate_get("/v1/speedtest/download?bytes=10001"), 413, "at most")


def test_upload_counts_and_discards(client: testing.TestClient) -> None:
    body = client.simulate_post("/v1/speedtest/upload", body=b"x" * 7777).json
    assert body["bytes"] == 7777 and body["seconds"] >= 0


def test_upload_over_the_cap_is_413(client: testing.TestClient) -> None:
    assert_json_error(client.simulate_post("/v1/speedtest/upload", body=b"x" * 10_001), 413)


def test_unknown_route_is_404_json(client: testing.TestClient) -> None:
    assert_json_error(client.simulate_get("/v1/nothing-here"), 404, "openapi")
    assert_json_error(client.simulate_get("/"), 404)


def test_wrong_method_is_405_json(client: testing.TestClient) -> None:
    result = client.simulate_delete("/v1/health")
    assert_json_error(result, 405, "method")
    assert "GET" in result.headers["allow"]


def test_malformed_json_is_400(client: testing.TestClient) -> None:
    result = client.simulate_post("/v1/echo", body=b'{"a": 1', content_type="application/json")
    assert_json_error(result, 400, "not valid JSON")
    assert_json_error(client.simulate_post("/v1/echo", body=b""), 400, "expected a JSON body")
    assert_json_error(client.simulate_post("/v1/echo", body=b"\xff\xfe"), 400)
    assert client.simulate_post("/v1/echo", json={"a": [1, 2]}).json == {"echo": {"a": [1, 2]}}


def test_json_body_over_the_cap_is_413(client: testing.TestClient) -> None:
    assert_json_error(client.simulate_post("/v1/echo", json={"a": "x" * 2000}), 413,
                      "at most 1000 B here")


def test_error_in_a_responder_is_500_json_without_traceback(settings: Settings,
                                                             tmp_path: Path) -> None:
    class Boom:
        @hookimpl
        def p2prc_add_routes(self, app: falcon.App) -> None:
            class Fail:
                def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
                    raise RuntimeError("secret internals")
            app.add_route("/v1/boom", Fail())

    hooks = make_plugin_manager(load_entrypoints=False, plugins=[*BUILTINS, ("boom", Boom())])
    app = create_app(NodeServices(settings, tmp_path, hooks))
    result = testing.TestClient(app).simulate_get("/v1/boom")
    assert_json_error(result, 500)
    assert "secret internals" not in result.text


def test_openapi_lists_exactly_the_routes_that_exist(client: testing.TestClient) -> None:
    document = client.simulate_get("/v1/openapi.json").json
    assert document["openapi"].startswith("3.")
    declared = {(path, method) for path, ops in document["paths"].items() for method in ops}
    app = client.app
    real = {(template, method) for template, method, _ in openapi.routes(app)}
    assert declared == real
    assert ("/v1/speedtest/upload", "post") in declared
    # Every declared operation answers: no 404 or 405 for any of them.
    for path, method in declared:
        body = {} if method == "post" else None
        result = client.simulate_request(method.upper(), path, json=body)
        assert result.status_code not in (404, 405), (method, path, result.status_code)
