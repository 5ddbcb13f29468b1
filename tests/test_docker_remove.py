"""Removing a container that something else is removing at the same moment (the host's
``server containers kill``, the reaper, ``docker rm``): the engine answers 409 "removal ...
already in progress"; that removal's end is ours, not an error to show a caller."""

from __future__ import annotations

import threading
from typing import Any

import docker
import pytest
import requests

from p2prc_core.containers import ContainerError
from p2prc_plugins.docker import remove_container


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError("engine", response=response, explanation=explanation)


class Engine:
    """The SDK's ``containers`` as the engine answers while another removal runs: the
    container is there for ``left`` more looks, then gone (or, with ``looking``, each look
    after the first fails so)."""

    def __init__(self, refusal: docker.errors.APIError, left: int,
                 looking: docker.errors.APIError | None = None) -> None:
        self.refusal, self.left, self.looking, self.containers = refusal, left, looking, self
        self.looks = 0

    def get(self, container_id: str) -> Any:
        self.looks += 1
        if self.looking is not None and self.looks > 1:
            raise self.looking
        if self.left <= 0:
            raise docker.errors.NotFound("gone")
        self.left -= 1
        return self

    def remove(self, force: bool) -> None:
        raise self.refusal


IN_PROGRESS = "removal of container abc is already in progress"


def test_a_removal_under_way_elsewhere_is_waited_for_not_refused() -> None:
    engine = Engine(api_error(409, IN_PROGRESS), left=4)
    remove_container(engine, "abc" * 21 + "d")
    assert engine.left == 0  # it looked until the container was gone


def test_a_removal_elsewhere_that_never_ends_is_an_error_in_time() -> None:
    with pytest.raises(ContainerError, match="still removing abcabcabcabc after 0.3 s"):
        remove_container(Engine(api_error(409, IN_PROGRESS), left=10**6), "abc" * 21 + "d",
                         wait=0.3)


def test_an_engine_that_fails_while_the_other_removal_runs_is_a_clear_error() -> None:
    engine = Engine(api_error(409, IN_PROGRESS), left=10, looking=api_error(500, "disk I/O"))
    with pytest.raises(ContainerError, match="whether abcabcabcabc is removed: disk I/O"):
        remove_container(engine, "abc" * 21 + "d")


@pytest.mark.parametrize("status, said", [(409, "You cannot remove a running container"),
                                          (500, "driver failed")])
def test_any_other_refusal_is_the_engine_refusing(status: int, said: str) -> None:
    with pytest.raises(ContainerError, match=f"could not remove abcabcabcabc: {said}"):
        remove_container(Engine(api_error(status, said), left=1), "abc" * 21 + "d")


@pytest.mark.docker
@pytest.mark.integration
def test_two_removals_at_once_on_the_real_engine_both_end_well(engine: Any) -> None:
    """Whichever comes second (a 409, or the container already gone) ends without an
    error, and the container is gone."""
    def other(container_id: str, errors: list[BaseException]) -> None:
        try:
            engine.api.remove_container(container_id, force=True)
        except docker.errors.APIError as err:  # the second one may be the engine's
            if err.status_code not in (404, 409):
                errors.append(err)

    for _ in range(3):
        container = engine.containers.run("p2prc/base:latest", ["sleep", "60"], detach=True,
                                          labels={"org.p2prc.test": "remove"})
        errors: list[BaseException] = []
        thread = threading.Thread(target=other, args=(container.id, errors))
        thread.start()
        remove_container(engine, container.id)
        thread.join(60)
        assert not errors
        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(container.id)
