"""Squaring the host's leases with what its engine runs, after a process died where it should
not: the whole server killed (``reconcile`` at the next start) or one worker killed mid-create
(the reaper's ``take_on_orphans``, while the server goes on).

A create holds a *place* first (``pending-PID-HEX``: the creating process's id), labels its
container with that place, and settles place into lease when the container runs. So a
container of this node's with no lease is an orphan once its place is no longer held by a
live process, and then:

- running, its labels whole: adopted (a lease from its labels; the caller sees it in
  ``containers ls`` until its lease ends);
- not running (created but never started, or stopped), or a pooled one never handed out:
  removed;
- labels that cannot be read: left alone, logged (p2prc did not make it so).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING

from p2prc_core.leases import (
    LABEL,
    LABEL_DIRECT,
    LABEL_EXPIRES,
    LABEL_GPUS,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_PLACE,
    LABEL_PORTS,
    PENDING,
    POOL_OWNER,
    BackendContainer,
    Lease,
)
from p2prc_core.wire import MAX_GPUS

if TYPE_CHECKING:
    from p2prc_core.containers import ContainerService

log = logging.getLogger("p2prc.containers")


def place_token(unique: str) -> str:
    """The id of a place held by this process while it starts a container."""
    return f"{PENDING}{os.getpid()}-{unique}"


def creator_alive(place: str) -> bool:
    """Whether the process that holds ``place`` still runs (a place of an older version,
    without a process id, counts as alive: its time runs out instead)."""
    pid_text, _, rest = place.removeprefix(PENDING).partition("-")
    if not rest or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_places(service: ContainerService, now: float, *, all_pending: bool) -> list[str]:
    """The places no create will settle: run out, or their process is gone (``all_pending``:
    every place, at a start, when no create can be under way)."""
    places = [i for i in service.store.lease_ids() if i.startswith(PENDING)]
    if all_pending:
        return places
    ran_out = set(service.store.stale_places(now))
    return [p for p in places if p in ran_out or not creator_alive(p)]


def take_on_orphans(service: ContainerService, stale: list[str]) -> list[str]:
    """Adopt or remove this node's containers that have no lease and whose place is not held
    by a live create (``stale`` places are not). Returns the ids adopted."""
    live = _ours(service)
    held = service.store.lease_ids() - set(stale)
    orphans = [i for i, c in live.items()
               if i not in held and c.labels.get(LABEL_PLACE, "") not in held]
    if not orphans:
        return []
    # Asked again: a create that failed removes its container before it frees its place,
    # so one listed before that and gone now must not be adopted.
    again = _ours(service)
    adopted = []
    for container_id in orphans:
        container = again.get(container_id)
        if container is None:
            continue
        if _adopt(service, container):
            adopted.append(container_id)
    return adopted


def reconcile(service: ContainerService) -> dict[str, list[str]]:
    """At a start (no create under way): drop every place, empty the last run's warm pool,
    take on orphans, drop leases whose container is gone, free ports that nothing holds."""
    stale = stale_places(service, time.time(), all_pending=True)
    empty_pool(service, _ours(service))
    leased = {lease.id for lease in service.store.leases()}
    adopted = take_on_orphans(service, stale)
    for place in stale:
        service.store.forget(place)
    live = _ours(service)
    dropped = []
    for container_id in leased - set(live):
        service.store.forget(container_id)
        dropped.append(container_id)
    holders = set(live) | {lease.id for lease in service.store.leases()}
    for holder in service.store.holders():
        if holder not in holders and not holder.startswith(PENDING):
            service.store.forget(holder)
    return {"adopted": adopted, "dropped": dropped}


def empty_pool(service: ContainerService, live: dict[str, BackendContainer]) -> None:
    """At a start, the warm pool of the last run goes (its containers waited for no one
    in particular, and the pool is filled again): those with a pool lease, and those
    labelled for the pool that were never handed out. ``live`` loses them."""
    store = service.store
    pooled = {lease.id for lease in store.leases(POOL_OWNER)}
    leftover = {i for i, c in live.items() if c.labels.get(LABEL_OWNER) == POOL_OWNER
                and c.handed_out is None and i not in store.lease_ids()}
    for container_id in pooled | leftover:
        service._remove_quietly(container_id)
        store.release_pooled(container_id)
        live.pop(container_id, None)
    if pooled | leftover:
        log.info("the warm pool of the last run: %d containers removed",
                 len(pooled | leftover))


def _ours(service: ContainerService) -> dict[str, BackendContainer]:
    return {c.id: c for c in service.backend.containers()
            if c.labels.get(LABEL) == "1" and c.labels.get(LABEL_NODE) == service.node_id}


def _adopt(service: ContainerService, container: BackendContainer) -> bool:
    """Take on one orphan (see the module's text); True when adopted."""
    labels = container.labels
    try:
        ports = json.loads(labels.get(LABEL_PORTS, "[]"))
        expires = float(labels[LABEL_EXPIRES])
        owner = labels[LABEL_OWNER]
        gpus = json.loads(labels.get(LABEL_GPUS, "[]"))
        if not isinstance(gpus, list) or not all(
                isinstance(g, int) and 0 <= g < MAX_GPUS for g in gpus):
            raise ValueError(gpus)
        if not isinstance(ports, list) or not ports or not all(
                isinstance(p, dict) and isinstance(p.get("external"), int) for p in ports):
            raise ValueError(ports)
    except (ValueError, KeyError, TypeError):
        log.warning("container %s carries this node's label, but its other labels cannot be "
                    "read: left as it is", container.id[:12])
        return False
    if owner == POOL_OWNER:  # handed out: to whom, as the backend recorded
        owner, expires = container.handed_out or ("", 0.0)
    if not owner or container.state != "running":
        service._remove_quietly(container.id)
        log.info("container %s was left %s by a create that died; removed", container.id[:12],
                 "unclaimed" if not owner else container.state)
        return False
    host_key = ""
    try:
        host_key = service.backend.host_key(container.id, 2.0)
    except Exception:  # noqa: BLE001 - no key now: its owner sees none pinned, as before
        pass
    service.store.adopt(Lease(id=container.id, owner=owner, image=container.image,
                              ports=ports, created=time.time(), expires=expires,
                              gpu=bool(gpus), gpus=gpus, host_key=host_key,
                              direct=labels.get(LABEL_DIRECT) == "1"))
    log.info("container %s of %s was started by a create that died; it is leased to its "
             "caller until its lease ends", container.id[:12], owner)
    return True
