"""Handing a pooled container out, with Docker (see ``p2prc_core.warm_pool``).

A pooled container's entry script made its host key and waits, without sshd, on a pipe in
/run (a tmpfs where the root is read-only). To hand it to its one caller the host sets the
caller's CPU and memory limits (``docker update``), records the owner and the lease's end in
the container's name (its labels cannot change, and keep saying "pool"), and writes the
caller's key and limits into the pipe with ``docker exec`` (as root; nothing of the caller's
is put in a shell command: they are the script's arguments). Then sshd starts with that key.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from p2prc_core.containers import ContainerError, HandOut

WAITING = "P2PRC-POOL-WAITING"  # what the entry script says once it waits for its caller
HANDOUT_PIPE = "/run/p2prc-handout"
CPU_PERIOD = 100_000  # microseconds: a pooled container's CPUs are a quota of this period
WRITE_HANDOUT = (f'test -p {HANDOUT_PIPE} && printf "%s\\n" "$1" "$2" "$3" "$4" '
                 f'> {HANDOUT_PIPE}')
HANDOUT_SECONDS = 10  # the entry script reads at once; this bounds a broken one
# The name a handed-out container gets: its owner and the end of its lease.
HANDED_NAME = re.compile(r"p2prc-([0-9a-f]{12})-for-([a-z2-7]{26})-until-([0-9]{1,12})")
POOLED_NAME = re.compile(r"p2prc-pool-([0-9a-f]{12})")


def cpu_options(cpus: float) -> dict[str, int]:
    """A pooled container's CPU limit, as a quota that ``docker update`` can change later
    (a limit set as NanoCpus cannot be)."""
    return {"cpu_period": CPU_PERIOD, "cpu_quota": max(1000, round(cpus * CPU_PERIOD))}


def handed_out_name(name: str, given: HandOut) -> str:
    """The name of pooled container ``name`` once it is ``given.owner``'s.

    :raises ContainerError: not a pooled container's name, or an owner that is no node id.
    """
    pooled = POOLED_NAME.fullmatch(name.lstrip("/"))
    renamed = f"p2prc-{pooled.group(1)}-for-{given.owner}-until-{int(given.expires)}" \
        if pooled else ""
    if not HANDED_NAME.fullmatch(renamed):
        raise ContainerError(500, "Not a pooled container",
                             f"{name!r} is not a pooled container waiting for its caller.")
    return renamed


def handed_out_of(name: str) -> tuple[str, float] | None:
    """The owner and the lease's end a handed-out container's name records (else None)."""
    found = HANDED_NAME.fullmatch(name.lstrip("/"))
    return (found.group(2), float(found.group(3))) if found else None


def hand_out(client: Any, container_id: str, given: HandOut) -> None:
    """Give pooled container ``container_id`` to ``given.owner``: limits, name, key. The
    three are the engine's to do at once (none waits for another: the caller learns of the
    container only when all are done), so they are asked for together.

    :raises ContainerError: it is gone, the engine refused, or the entry script did not
        take the key (the caller then gets a container started for it).
    """
    import docker
    import requests

    def limits() -> None:
        container.update(**cpu_options(given.cpus), mem_limit=given.memory,
                         memswap_limit=given.memory)

    def key() -> Any:
        return container.exec_run(
            ["timeout", str(HANDOUT_SECONDS), "sh", "-c", WRITE_HANDOUT, "p2prc-hand-out",
             given.ssh_key, f"{given.cpus:g}", str(given.memory),
             str(max(1, math.ceil(given.cpus)))], user="root")

    try:
        container = client.containers.get(container_id)
        name = handed_out_name(container.name, given)
        with ThreadPoolExecutor(max_workers=2) as pool:
            asked = [pool.submit(limits), pool.submit(container.rename, name)]
            result = key()
            for done in asked:
                done.result()
    except (docker.errors.DockerException, requests.exceptions.ConnectionError) as err:
        raise ContainerError(500, "Hand-out failed",
                             f"pooled container {container_id[:12]}: {err}") from None
    if result.exit_code != 0:
        raise ContainerError(500, "Hand-out failed",
                             f"pooled container {container_id[:12]} did not take its key "
                             f"(exit {result.exit_code}): "
                             f"{bytes(result.output or b'').decode(errors='replace')[-200:]}")
