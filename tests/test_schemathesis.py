"""Property-based requests from the API's own OpenAPI document (schemathesis), unsigned and
signed by a trusted caller, against the real app over a fake container backend: no answer
is a 5xx, and every answer's status is one the document declares."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from test_container_rules import FakeBackend, FakeBackendPlugin

from conftest import BUILTINS, require
from p2prc_core.config import Settings
from p2prc_core.identity import NodeIdentity
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.server import create_app
from p2prc_core.services import NodeServices
from p2prc_core.signing import sign_request
from p2prc_core.trust import TrustStore

try:
    import schemathesis
except ImportError:  # in the test extra; a skip in CI is a failure (conftest.require)
    schemathesis = None
CASES_PER_OPERATION = 150  # at most, per operation: hypothesis stops early on small inputs


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> tuple[testing.TestClient, NodeServices,
                                                           NodeIdentity]:
    home = tmp_path_factory.mktemp("schemathesis")
    caller = NodeIdentity.generate()
    TrustStore(home).add(caller.node_id, "caller")
    plugins = [(n, m) for n, m in BUILTINS if n != "nvidia"]
    plugins.append(("fake-backend", FakeBackendPlugin(FakeBackend())))
    node = NodeServices(Settings(backend="fake", port_range="47200-47299",
                                 speedtest_max_bytes=1 << 20, max_body_bytes=64 << 10),
                        home, make_plugin_manager(load_entrypoints=False, plugins=plugins))
    return testing.TestClient(create_app(node)), node, caller


def request_of(case: Any, identity: NodeIdentity | None,
               target: str) -> tuple[str, str, bytes, dict[str, str]]:
    body = case.body
    if body is None or type(body).__name__ == "NotSet":
        raw = b""
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = json.dumps(body).encode()
    headers = {k: str(v) for k, v in (case.headers or {}).items()
               if k.lower() not in ("content-length", "host", "transfer-encoding")}
    if raw and case.media_type:
        headers["Content-Type"] = case.media_type
    query = urlencode(case.query or {}, doseq=True)
    if identity is not None:
        headers.update(sign_request(identity, case.method, case.formatted_path, query, raw,
                                    target))
    return case.formatted_path, query, raw, headers


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_no_5xx_and_only_declared_answers(app: Any, monkeypatch: pytest.MonkeyPatch,
                                          signed: bool) -> None:
    require(schemathesis is not None, "schemathesis is missing: pip install -e '.[test]'")
    monkeypatch.setattr("p2prc_core.containers.port_is_free", lambda port: True)
    client, node, caller = app
    document = client.simulate_get("/v1/openapi.json").json
    schema = schemathesis.openapi.from_dict(document)
    seen: Counter[str] = Counter()
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        run_operation(operation, set(document["paths"][operation.path][operation.method]
                                     ["responses"]), client, node, caller if signed else None,
                      seen, problems)
    total = sum(seen.values())
    print(f"\nschemathesis, {'signed' if signed else 'unsigned'}: {total} cases, answers "
          f"{dict(sorted(seen.items()))}")
    assert total >= 500, "too few cases were drawn"  # about 600 each way, 1,200 in all
    assert problems == [], problems[:10]


def run_operation(operation: Any, declared: set[str], client: testing.TestClient,
                  node: NodeServices, caller: NodeIdentity | None, seen: Counter[str],
                  problems: list[str]) -> None:
    @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        path, query, raw, headers = request_of(case, caller, node.identity.node_id)
        answer = client.simulate_request(case.method, path, query_string=query, body=raw,
                                         headers=headers)
        status = str(answer.status_code)
        seen[status] += 1
        if answer.status_code >= 500 or status not in declared | {"304", "404"}:
            problems.append(f"{case.method} {path}?{query} -> {status}: {answer.text[:200]}")

    run()
