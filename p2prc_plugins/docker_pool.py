"""Handing a pooled container out, with Docker (see ``p2prc_core.warm_pool``).

A pooled container's entry script made its host key and waits, without sshd, reading its
standard input (the container is made with stdin open, and nothing but the host's engine
can write there). To hand it to its one caller the host sets the caller's CPU and memory
limits (``docker update``), records the owner and the lease's end in the container's name
(its labels cannot change, and keep saying "pool"), and writes the caller's key and limits,
one a line, to that input through the engine's attach (2 ms, where a ``docker exec`` that
wrote them took 60). Then sshd starts with that key, its input /dev/null.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from p2prc_core.containers import ContainerError, HandOut

WAITING = "P2PRC-POOL-WAITING"  # what the entry script says once it waits for its caller
# ... and this, where it reads its caller from its input (an image built before says only
# the first, and waits on a pipe that nothing here writes to: its containers are not used).
WAITING_ON_STDIN = f"{WAITING} stdin"
CPU_PERIOD = 100_000  # microseconds: a pooled container's CPUs are a quota of this period
_LINE = re.compile(r"[\x20-\x7e]{1,16384}")  # one line of the hand-out: printable, no break
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
    container only when all are done), so they are asked for together. Whether the entry
    script took the key shows when its sshd starts (``DockerBackend.host_key``).

    :raises ContainerError: it is gone, the engine refused, it does not read its input (made
        by an earlier p2prc, or from an earlier image), or a line that is not one line (the
        caller then gets a container started for it).
    """
    import docker
    import requests

    lines = [given.ssh_key, f"{given.cpus:g}", str(given.memory),
             str(max(1, math.ceil(given.cpus)))]
    if not all(_LINE.fullmatch(line) for line in lines):
        raise ContainerError(500, "Hand-out refused", "a hand-out line is not one printable "
                                                      "line")

    def limits() -> None:
        container.update(**cpu_options(given.cpus), mem_limit=given.memory,
                         memswap_limit=given.memory)

    try:
        container = client.containers.get(container_id)
        name = handed_out_name(container.name, given)
        if not container.attrs.get("Config", {}).get("OpenStdin") or \
                WAITING_ON_STDIN not in container.logs().decode(errors="replace"):
            raise ContainerError(500, "Hand-out failed",
                                 f"pooled container {container_id[:12]} does not read its "
                                 f"caller from its input (an earlier image or p2prc made "
                                 f"it: 'p2prc image build' builds the current image)")
        with ThreadPoolExecutor(max_workers=2) as pool:
            asked = [pool.submit(limits), pool.submit(container.rename, name)]
            _write_input(client, container_id, ("\n".join(lines) + "\n").encode("ascii"))
            for done in asked:
                done.result()
    except (docker.errors.DockerException, requests.exceptions.ConnectionError,
            OSError) as err:
        raise ContainerError(500, "Hand-out failed",
                             f"pooled container {container_id[:12]}: {err}") from None


def _write_input(client: Any, container_id: str, data: bytes) -> None:
    """``data`` to the container's standard input, through the engine's attach (its stdin
    only: nothing is read back); closed once written, which its input outlives."""
    attached = client.api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
    sock = getattr(attached, "_sock", attached)
    try:
        sock.sendall(data)
    finally:
        for each in (sock, attached):
            each.close()
