"""The host's container rules without Docker: a fake backend, registered through
``p2prc_register_backends`` like any plugin, driven through the real app (falcon.testing) with
signed requests. What the real engine does is tested in test_containers.py."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from conftest import BUILTINS
from p2prc_core import hookimpl
from p2prc_core.config import Settings
from p2prc_core.containers import (
    LABEL,
    LABEL_EXPIRES,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_PORTS,
    BackendContainer,
    ContainerError,
    ContainerSpec,
    PortTaken,
)
from p2prc_core.errors import Refusal
from p2prc_core.identity import NodeIdentity
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.server import create_app
from p2prc_core.services import NodeServices
from p2prc_core.signing import sign_request
from p2prc_core.trust import TrustStore

ALICE, BOB = NodeIdentity.generate(), NodeIdentity.generate()
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxzX3ZkbnRmZXJ0eW9wYXNkZmdoamtsenhjdmJubTEy me"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"


class FakeBackend:
    """An engine in memory: what the service asked for, and what it runs."""

    def __init__(self) -> None:
        self.running: dict[str, BackendContainer] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.gpu_support = False
        self.fail_create: str | None = None
        self.ports_taken = 0  # creates that find a port taken after all
        self.fail_remove = False  # the engine cannot remove now
        self.refused_specs: list[ContainerSpec] = []
        self.fail_host_key = False
        self.removed: list[str] = []
        self.built: list[tuple[str, bool]] = []

    def create(self, spec: ContainerSpec) -> str:
        if self.fail_create:
            raise ContainerError(500, "Engine refused", self.fail_create)
        if self.ports_taken:
            self.ports_taken -= 1
            self.refused_specs.append(spec)
            raise PortTaken(f"Bind for ::1:{spec.ports[0]} failed: port is already allocated")
        container_id = hashlib.sha256(spec.name.encode()).hexdigest()
        self.specs[container_id] = spec
        self.running[container_id] = BackendContainer(container_id, "running", spec.image,
                                                      dict(spec.labels))
        return container_id

    def host_key(self, container_id: str, timeout: float) -> str:
        if self.fail_host_key:
            raise ContainerError(504, "Container too slow", "sshd did not start")
        return HOST_KEY

    def remove(self, container_id: str) -> None:
        if self.fail_remove:
            raise ContainerError(503, "Cannot run containers now", "the engine is away")
        self.removed.append(container_id)
        self.running.pop(container_id, None)

    def containers(self) -> list[BackendContainer]:
        return list(self.running.values())

    def images(self) -> list[dict[str, Any]]:
        return [{"name": "p2prc/base:latest", "id": "sha256:1", "size": 1},
                {"name": "someone/else:1", "id": "sha256:2", "size": 1}]

    def gpu_available(self) -> bool:
        return self.gpu_support

    def build_image(self, tag: str, from_debootstrap: bool, force: bool,
                    say: Callable[[str], None]) -> bool:
        self.built.append((tag, from_debootstrap))
        return True

    def usage(self, container_id: str) -> dict[str, float]:
        raise Refusal("this fake engine measures nothing", 503)


class FakeBackendPlugin:
    def __init__(self, backend: FakeBackend):
        self.backend = backend

    @hookimpl
    def p2prc_register_backends(self, register: Callable[[str, Any], None]) -> None:
        register("fake", self.backend)


class FakeGPUs:
    """``count`` GPUs, as NVML lists them; GPU i is /dev/nvidia(i + 4) (minor numbers need
    not be the indexes)."""

    def __init__(self, count: int):
        self.count = count

    @hookimpl
    def p2prc_collect_specs(self) -> dict[str, Any]:
        return {"gpus": [{"index": i, "minor": i + 4, "name": "Fake GPU",
                          "memory_total": 1 << 30} for i in range(self.count)]}


class Host:
    """A host's app over a fake backend, and signed requests to it."""

    def __init__(self, home: Path, gpus: int = 0, **options: Any):
        self.backend = FakeBackend()
        plugins: list[tuple[str, object]] = [
            (n, m) for n, m in BUILTINS if n != "nvidia"]  # GPUs only from FakeGPUs
        plugins.append(("fake-backend", FakeBackendPlugin(self.backend)))
        if gpus:
            plugins.append(("fake-gpus", FakeGPUs(gpus)))
        settings = Settings(**{"backend": "fake", "port_range": "47100-47119",
                               "containers_per_caller": 3, **options})
        self.node = NodeServices(settings, home, make_plugin_manager(load_entrypoints=False,
                                                                    plugins=plugins))
        self.client = testing.TestClient(create_app(self.node))
        TrustStore(home).add(ALICE.node_id, "alice")

    def request(self, method: str, path: str, body: Any = None,
                who: NodeIdentity = ALICE) -> testing.Result:
        raw = b"" if body is None else json.dumps(body).encode()
        headers = sign_request(who, method, path, "", raw, self.node.identity.node_id)
        if raw:
            headers["Content-Type"] = "application/json"
        return self.client.simulate_request(method, path, body=raw, headers=headers)

    def create(self, who: NodeIdentity = ALICE, **fields: Any) -> testing.Result:
        return self.request("POST", "/v1/containers", {"ssh_key": SSH_KEY, **fields}, who)

    def held_ports(self) -> dict[int, str]:
        return self.node.hosting.service().store.held_ports()


@pytest.fixture(autouse=True)
def ports_are_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's ports count as free whatever this machine runs (the fake engine binds
    nothing; the real one is tested with real ports in test_containers.py)."""
    monkeypatch.setattr("p2prc_core.containers.port_is_free", lambda port: True)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "host")


def assert_refused(result: testing.Result, status: int, words: str) -> None:
    assert result.status_code == status, result.json
    assert words in result.json["description"], result.json


def test_a_create_runs_exactly_the_spec_and_answers_how_to_log_in(host: Host) -> None:
    result = host.create(ports=2, cpus=0.5, memory=128 << 20, ttl=600)
    assert result.status_code == 201, result.json
    reply = result.json
    [(container_id, spec)] = host.backend.specs.items()
    assert reply["id"] == container_id and reply["node_id"] == host.node.identity.node_id
    assert (spec.cpus, spec.memory, spec.pids, spec.gpu) == (0.5, 128 << 20, 512, False)
    assert spec.ssh_key == SSH_KEY and spec.image == "p2prc/base:latest"
    assert len(spec.ports) == 3 and all(47100 <= p <= 47119 for p in spec.ports)
    assert spec.labels[LABEL] == "1" and spec.labels[LABEL_OWNER] == ALICE.node_id
    assert spec.labels[LABEL_NODE] == host.node.identity.node_id
    assert json.loads(spec.labels[LABEL_PORTS]) == reply["ports"]
    assert int(spec.labels[LABEL_EXPIRES]) == int(reply["expires"])
    assert reply["ports"][0] == {"name": "ssh", "internal": 22, "external": spec.ports[0]}
    assert reply["ssh"]["host_key"] == HOST_KEY
    assert reply["ssh"]["fingerprint"].startswith("SHA256:")
    assert reply["expires"] - reply["created"] == pytest.approx(600)
    assert set(host.held_ports()) == set(spec.ports)


@pytest.mark.parametrize("fields, words", [
    ({"privileged": True}, "Unknown fields ['privileged']"),
    ({"ssh_key": "not a key"}, "one OpenSSH public key"),
    ({"image": "../../etc"}, "not a valid image"),
    ({"gpu": "yes"}, "true or false"),
    ({"ports": -1}, "from 0 up"),
    ({"ports": 1.5}, "whole number"),
    ({"cpus": True}, "cpus must be a number"),
    ({"memory": "1G"}, "memory must be a whole number"),
    ({"ttl": 0}, "from 1 up"),
])
def test_malformed_requests_are_400_and_start_nothing(host: Host, fields: dict[str, Any],
                                                      words: str) -> None:
    assert_refused(host.create(**fields), 400, words)
    assert host.backend.specs == {} and host.held_ports() == {}


def test_a_body_that_is_not_an_object_is_400(host: Host) -> None:
    assert_refused(host.request("POST", "/v1/containers", ["ports"]), 400, "JSON object")


@pytest.mark.parametrize("fields, words", [
    ({"cpus": 64}, "cpus 64 is over this host's limit of 2"),
    ({"memory": 100 << 30}, "memory 100 GiB is over this host's limit of 4 GiB"),
    ({"ports": 9}, "ports 9 is over this host's limit of 8"),
    ({"ttl": 30 * 86400}, "ttl 30 days is over this host's limit of 7 days"),
    ({"image": "someone/else:1"}, "This host offers p2prc/base:latest"),
    ({"memory": 1}, "below this host's minimum of 16 MiB"),  # the engine would refuse it
])
def test_requests_over_a_limit_are_422_and_start_nothing(host: Host, fields: dict[str, Any],
                                                         words: str) -> None:
    assert_refused(host.create(**fields), 422, words)
    assert host.backend.specs == {} and host.held_ports() == {}


def test_a_gpu_is_409_without_one_and_given_with_one(tmp_path: Path) -> None:
    without = Host(tmp_path / "plain")
    assert_refused(without.create(gpu=True), 409, "no NVIDIA GPU")
    no_toolkit = Host(tmp_path / "gpu", gpus=1)
    assert_refused(no_toolkit.create(gpu=True), 409, "no NVIDIA container toolkit")
    no_toolkit.backend.gpu_support = True
    assert no_toolkit.create(gpu=True).status_code == 201
    [spec] = no_toolkit.backend.specs.values()
    assert spec.gpu is True and spec.gpus == [{"index": 0, "minor": 4}]


@pytest.fixture
def gpu_host(tmp_path: Path) -> Host:
    host = Host(tmp_path / "gpus", gpus=2, gpus_per_caller=0)  # holders, not a caller's share
    host.backend.gpu_support = True
    TrustStore(host.node.home).add(BOB.node_id, "bob")
    return host


def free_gpus(host: Host) -> list[bool]:
    """What /v1/specs says of each GPU, as a peer sees it."""
    return [g["free"] for g in host.request("GET", "/v1/specs").json["gpus"]]


def test_each_gpu_has_one_holder_and_the_host_says_which(gpu_host: Host) -> None:
    first = gpu_host.create(gpu=1)
    assert first.status_code == 201 and first.json["gpus"] == [0], first.json
    assert free_gpus(gpu_host) == [False, True]
    assert gpu_host.node.own.record()["specs"]["gpus_free"] == 1
    assert_refused(gpu_host.create(who=BOB, gpu=[0]), 409, "GPU 0 is held by another "
                                                           "container; free now: 1")
    assert_refused(gpu_host.create(who=BOB, gpu=2), 409, "2 GPUs asked for, 1 free now")
    second = gpu_host.create(who=BOB, gpu=True)  # every free GPU: GPU 1
    assert second.json["gpus"] == [1]
    assert gpu_host.backend.specs[second.json["id"]].gpus == [{"index": 1, "minor": 5}]
    assert_refused(gpu_host.create(gpu=True), 409, "held by other containers")
    assert gpu_host.node.own.record()["specs"]["gpus_free"] == 0
    assert gpu_host.create().status_code == 201  # no GPU asked for: still served
    assert len(gpu_host.backend.specs) == 3  # the refused creates started nothing
    assert gpu_host.request("DELETE", f"/v1/containers/{first.json['id']}").status_code == 200
    assert free_gpus(gpu_host) == [True, False]
    assert gpu_host.create(gpu=[0]).json["gpus"] == [0]


def test_gpus_the_host_has_not_are_422(gpu_host: Host) -> None:
    assert_refused(gpu_host.create(gpu=[2]), 422, "No GPU 2 here: this host has 2 GPUs (0, 1)")
    assert_refused(gpu_host.create(gpu=3), 422, "3 GPUs asked for")
    assert gpu_host.backend.specs == {} and gpu_host.held_ports() == {}


@pytest.mark.parametrize("gpu", ["yes", 0, -1, 65, [], [1, 1], [-1], [True], [0.5], {"n": 1},
                                 list(range(65))])
def test_a_malformed_gpu_ask_is_400(gpu_host: Host, gpu: Any) -> None:
    assert_refused(gpu_host.create(gpu=gpu), 400, "gpu must be true or false, a count")


def test_reaping_and_reconciling_free_and_retake_gpus(gpu_host: Host) -> None:
    service = gpu_host.node.hosting.service()
    short = gpu_host.create(gpu=1, ttl=60).json["id"]
    kept = gpu_host.create(who=BOB, gpu=1, ttl=3600).json["id"]
    assert service.store.gpu_holders() == {0: [short], 1: [kept]}
    assert service.reap(now=time.time() + 61) == [short]
    assert service.store.gpu_holders() == {1: [kept]}
    service.store.forget(kept)  # the host's state is lost; the engine still runs it
    assert service.store.gpu_holders() == {}
    assert service.reconcile()["adopted"] == [kept]
    assert service.store.gpu_holders() == {1: [kept]}
    assert_refused(gpu_host.create(gpu=[1]), 409, "GPU 1 is held")


def test_a_failed_create_frees_its_gpus(gpu_host: Host) -> None:
    gpu_host.backend.fail_host_key = True
    assert_refused(gpu_host.create(gpu=2), 504, "sshd did not start")
    assert gpu_host.node.hosting.service().store.gpu_holders() == {}
    gpu_host.backend.fail_host_key = False
    assert gpu_host.create(gpu=2).json["gpus"] == [0, 1]


def test_gpu_share_gives_one_gpu_to_several_least_held_first(tmp_path: Path) -> None:
    host = Host(tmp_path / "shared", gpus=2, gpu_share=True, gpus_per_caller=0)
    host.backend.gpu_support = True
    TrustStore(host.node.home).add(BOB.node_id, "bob")
    assert host.create(gpu=[0]).json["gpus"] == [0]
    assert host.create(who=BOB, gpu=[0]).json["gpus"] == [0]
    assert host.create(gpu=1).json["gpus"] == [1]  # the less held one
    assert free_gpus(host) == [True, True]
    assert host.create(who=BOB, gpu=True).json["gpus"] == [0, 1]


def test_the_per_caller_limit_is_429_and_a_removal_frees_a_place(host: Host) -> None:
    ids = [host.create().json["id"] for _ in range(3)]
    assert_refused(host.create(), 429, "limit per caller")
    TrustStore(host.node.home).add(BOB.node_id)
    assert host.create(who=BOB).status_code == 201  # the limit is per caller
    assert host.request("DELETE", f"/v1/containers/{ids[0]}").status_code == 200
    assert host.create().status_code == 201


def test_an_exhausted_port_pool_is_503(tmp_path: Path) -> None:
    host = Host(tmp_path / "host", port_range="47120-47122")
    assert host.create(ports=2).status_code == 201
    assert_refused(host.create(), 503, "0 free ports; 1 are needed")


def test_callers_see_and_remove_only_their_own(host: Host) -> None:
    TrustStore(host.node.home).add(BOB.node_id)
    mine = host.create().json["id"]
    theirs = host.create(who=BOB).json["id"]
    listed = host.request("GET", "/v1/containers").json["containers"]
    assert [c["id"] for c in listed] == [mine] and listed[0]["state"] == "running"
    assert host.request("GET", f"/v1/containers/{mine[:12]}").json["id"] == mine
    assert_refused(host.request("DELETE", f"/v1/containers/{theirs}"), 404, "No p2prc")
    assert_refused(host.request("DELETE", f"/v1/containers/{'e' * 64}"), 404, "No p2prc")
    assert_refused(host.request("DELETE", "/v1/containers/not-hex"), 400, "lower-case hex")
    assert theirs in host.backend.running
    removed = host.request("DELETE", f"/v1/containers/{mine}")
    assert removed.json == {"removed": mine} and mine not in host.backend.running
    assert_refused(host.request("GET", f"/v1/containers/{mine}"), 404, "No p2prc")


def test_an_untrusted_or_unsigned_caller_starts_nothing(host: Host) -> None:
    assert_refused(host.create(who=BOB), 403, f"p2prc trust {BOB.node_id}")
    unsigned = host.client.simulate_post("/v1/containers", json={"ssh_key": SSH_KEY})
    assert unsigned.status_code == 401
    assert host.backend.specs == {}


def test_a_port_taken_after_the_pool_checked_it_is_tried_again_on_others(host: Host) -> None:
    """Another host on this machine (or any program) took a chosen port between the pool's
    check and the engine's start: the create goes on with other ports, up to three tries,
    and leaves nothing of the failed ones."""
    host.backend.ports_taken = 2
    created = host.create(ports=1)
    assert created.status_code == 201, created.json
    taken = [spec.ports[0] for spec in host.backend.refused_specs]
    assert len(taken) == 2 and created.json["ports"][0]["external"] not in taken
    assert host.held_ports() == {p["external"]: created.json["id"]
                                 for p in created.json["ports"]}
    host.backend.ports_taken = 3
    assert_refused(host.create(ports=1), 503, "port is already allocated")
    assert len(host.node.hosting.service().store.leases()) == 1


def test_a_create_that_failed_with_its_container_unsure_is_removed_never_adopted(
        host: Host) -> None:
    """The caller was told no, but the engine could not remove what the create started:
    the place stays (doomed: the caller's room and ports held) until the reaper has
    removed that container; it is never adopted for the caller."""
    service = host.node.hosting.service()
    host.backend.fail_host_key = True  # started, then the create fails
    host.backend.fail_remove = True  # and the engine cannot remove it now
    assert_refused(host.create(), 504, "sshd did not start")
    [place] = service.store.places()
    assert service.store.places()[place] is True and host.held_ports()
    assert len(host.backend.running) == 1
    service.reap()  # still cannot remove it: kept, not adopted
    assert service.store.leases() == [] and list(service.store.places()) == [place]
    host.backend.fail_remove = host.backend.fail_host_key = False
    service.reap()
    assert host.backend.running == {} and service.store.places() == {}
    assert host.held_ports() == {} and service.store.leases() == []
    assert host.create().status_code == 201


def test_a_failed_create_releases_its_place_and_ports(host: Host) -> None:
    host.backend.fail_create = "no space left on device"
    assert_refused(host.create(ports=3), 500, "no space left on device")
    assert host.held_ports() == {} and host.node.hosting.service().store.leases() == []
    host.backend.fail_create = None
    host.backend.fail_host_key = True  # started, but sshd never came up
    assert_refused(host.create(ports=1), 504, "sshd did not start")
    assert host.backend.running == {} and host.held_ports() == {}
    host.backend.fail_host_key = False
    assert [host.create().status_code for _ in range(3)] == [201] * 3  # no place was lost


def test_expired_leases_are_reaped_and_their_ports_freed(host: Host) -> None:
    short = host.create(ttl=60).json["id"]
    long = host.create(ttl=3600).json["id"]
    service = host.node.hosting.service()
    assert service.reap() == []
    assert service.reap(now=time.time() + 61) == [short]
    assert set(host.backend.running) == {long}
    assert set(host.held_ports().values()) == {long}
    assert [c["id"] for c in host.request("GET", "/v1/containers").json["containers"]] == [long]


def test_a_create_that_died_half_way_is_cleared_by_the_reaper(host: Host) -> None:
    store = host.node.hosting.service().store
    store.reserve(ALICE.node_id, 2, 3, "pending-crashed")
    assert len(host.held_ports()) == 2
    assert host.node.hosting.service().reap(now=time.time() + 601) == []
    assert host.held_ports() == {}


def test_a_lease_whose_container_vanished_shows_gone(host: Host) -> None:
    container_id = host.create().json["id"]
    del host.backend.running[container_id]  # removed behind p2prc's back
    [listed] = host.request("GET", "/v1/containers").json["containers"]
    assert listed["state"] == "gone"


def test_reconcile_adopts_labelled_containers_and_drops_vanished_leases(host: Host) -> None:
    service = host.node.hosting.service()
    kept = host.create(ports=1).json
    vanished = host.create().json["id"]
    del host.backend.running[vanished]
    # The state is lost (a new home would be the same): the engine still runs `kept`.
    service.store.forget(kept["id"])
    foreign = BackendContainer("f" * 64, "running", "x", {LABEL: "1", LABEL_NODE: "other"})
    host.backend.running[foreign.id] = foreign
    assert service.reconcile() == {"adopted": [kept["id"]], "dropped": [vanished]}
    [lease] = service.list_leases(ALICE.node_id)
    assert lease.id == kept["id"] and lease.ports == kept["ports"]
    assert set(host.held_ports()) == {p["external"] for p in kept["ports"]}
    assert service.reconcile() == {"adopted": [], "dropped": []}


def test_no_backend_is_503_with_the_reason(tmp_path: Path) -> None:
    host = Host(tmp_path / "host", backend="nothing")
    assert_refused(host.create(), 503, "'nothing' backend is not installed")
    assert host.node.hosting.reap() == []  # the reaper has nothing to do, and does not fail


def test_the_images_route_lists_only_offered_images(host: Host) -> None:
    images = host.client.simulate_get("/v1/images").json["images"]
    assert [(i["backend"], i["name"]) for i in images] == [("fake", "p2prc/base:latest")]


# -- stopped containers, GPUs per caller, other owners' ids -----------------------------------

def test_a_stopped_container_is_removed_after_the_grace_with_all_it_held(
        tmp_path: Path) -> None:
    host = Host(tmp_path / "host", gpus=1, containers_per_caller=2,
                container_exited_grace=300)
    host.backend.gpu_support = True
    service = host.node.hosting.service()
    stopped = host.create(ports=1, gpu=True).json["id"]
    kept = host.create().json["id"]
    host.backend.running[stopped].state = "exited"  # its PID 1 ended, or the OOM killer
    now = time.time()
    assert service.reap(now=now) == []  # seen stopped: its grace starts now
    assert service.reap(now=now + 299) == [] and stopped in host.backend.running
    states = {c["id"]: c["state"] for c in host.request("GET", "/v1/containers").json[
        "containers"]}
    assert states == {stopped: "exited", kept: "running"}
    assert_refused(host.create(), 429, "limit per caller")  # it still holds its place
    service.reap(now=now + 301)
    assert stopped in host.backend.removed and set(host.held_ports().values()) == {kept}
    assert service.store.gpu_holders() == {}
    assert [c["id"] for c in host.request("GET", "/v1/containers").json["containers"]] == [kept]
    assert host.create(gpu=True).status_code == 201  # its place and its GPU are free again


def test_a_container_that_runs_again_or_vanished_is_timed_from_when_seen_stopped(
        host: Host) -> None:
    service = host.node.hosting.service()
    restarted, vanished = host.create().json["id"], host.create().json["id"]
    now = time.time()
    host.backend.running[restarted].state = "exited"
    service.reap(now=now)
    host.backend.running[restarted].state = "running"  # the host started it again
    service.reap(now=now + 1)
    host.backend.running[restarted].state = "exited"
    del host.backend.running[vanished]  # removed behind p2prc's back
    service.reap(now=now + 2)
    service.reap(now=now + 300)  # the default grace is 5 minutes from when seen stopped
    assert restarted in host.backend.running and len(host.held_ports()) == 2
    service.reap(now=now + 303)
    assert host.backend.running == {} and host.held_ports() == {}
    assert host.node.hosting.service().store.leases() == []


def test_gpus_per_caller_caps_what_one_caller_holds(tmp_path: Path) -> None:
    host = Host(tmp_path / "gpus", gpus=3)  # gpus_per_caller: 1 by default
    host.backend.gpu_support = True
    TrustStore(host.node.home).add(BOB.node_id, "bob")
    assert host.create(gpu=True).json["gpus"] == [0]  # every free GPU it may hold: one
    for ask in (True, 1, [2]):
        assert_refused(host.create(gpu=ask), 429, "limit of 1 GPU per caller "
                                                  "(gpus_per_caller)")
    assert host.create().status_code == 201  # a container without a GPU is still given
    assert_refused(host.create(who=BOB, gpu=2), 429, "limit of 1 GPU per caller")
    assert host.create(who=BOB, gpu=[2]).json["gpus"] == [2]
    assert sorted(host.node.hosting.service().store.gpu_holders()) == [0, 2]
    wide = Host(tmp_path / "wide", gpus=3, gpus_per_caller=2)
    wide.backend.gpu_support = True
    assert wide.create(gpu=True).json["gpus"] == [0, 1]
    assert_refused(wide.create(gpu=1), 429, "limit of 2 GPUs per caller")
    unlimited = Host(tmp_path / "unlimited", gpus=3, gpus_per_caller=0)
    unlimited.backend.gpu_support = True
    assert unlimited.create(gpu=True).json["gpus"] == [0, 1, 2]


def test_another_callers_container_is_no_such_container(host: Host) -> None:
    TrustStore(host.node.home).add(BOB.node_id)
    theirs = host.create(who=BOB).json["id"]
    unknown = "e" * 64
    for method in ("GET", "DELETE"):
        for given in (theirs[:12], theirs):
            answer = host.request(method, f"/v1/containers/{given}")
            assert answer.status_code == 404, answer.json
            assert theirs[:12] not in answer.text  # nothing of its id comes back
            assert answer.json == host.request(method, f"/v1/containers/{unknown}").json
    assert theirs in host.backend.running
