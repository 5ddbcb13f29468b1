"""Squaring the host's leases with what its engine runs, after a process died where it should
not: the whole server killed (``reconcile`` at the next start) or one worker killed mid-create
(the reaper's ``take_on_orphans``, while the server goes on).

A create holds a *place* first (``pending-PID-START-HEX``: the creating process's id and its
start time, so a reused id is not taken for it), labels its container with that place, and
settles place into lease when the container runs. So a container of this node's with no
lease is an orphan once its place is no longer held by a live process, and then:

- running, its labels whole: adopted (a lease from its labels; the caller sees it in
  ``containers ls`` until its lease ends);
- not running (created but never started, or stopped), or a pooled one never handed out:
  removed;
- labels that cannot be read: left alone, logged once (p2prc did not make it so).

A create that failed and could not make sure its container is gone (the engine went away)
marks its place *doomed* instead of freeing it: the caller was told no, so whatever that
create started is removed, never adopted, and the place (its ports, GPUs and the caller's
room) is freed once the engine lists nothing of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING

from p2prc_core import pids
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
_UNREADABLE: set[str] = set()  # orphans whose labels could not be read, said once each


_PLACE = re.compile(r"pending-([0-9]{1,10})-([0-9]{1,20})-[0-9a-f]{1,64}")
DOOMED = '{"doomed":1}'  # a place's data when its create failed with its container unsure


def place_token(unique: str) -> str:
    """The id of a place held by this process while it starts a container."""
    return f"{PENDING}{os.getpid()}-{pids.started(os.getpid())}-{unique}"


def creator_alive(place: str) -> bool:
    """Whether the process that holds ``place`` still runs: its id names a live process that
    started when the place's did. A place in another form counts as alive (its time runs
    out instead)."""
    found = _PLACE.fullmatch(place)
    return found is None or pids.alive(int(found.group(1)), int(found.group(2)))


def stale_places(service: ContainerService, now: float) -> list[str]:
    """The places no create will settle: run out, or their process is gone (doomed ones are
    not: ``take_on_orphans`` frees them)."""
    places = service.store.places()
    ran_out = set(service.store.stale_places(now))
    return [p for p, doomed in places.items()
            if not doomed and (p in ran_out or not creator_alive(p))]


def take_on_orphans(service: ContainerService, stale: list[str]) -> list[str]:
    """Adopt or remove this node's containers that have no lease and whose place is not held
    by a live create (``stale`` places are not); remove what doomed places started, and
    free those places once nothing of them is left. Returns the ids adopted."""
    live = _ours(service)
    doomed = {p for p, is_doomed in service.store.places().items() if is_doomed}
    held = service.store.lease_ids() - set(stale) - doomed
    orphans = [i for i, c in live.items()
               if i not in held and c.labels.get(LABEL_PLACE, "") not in held]
    adopted = []
    if orphans:
        # Asked again: a create that failed removes its container before it frees its
        # place, so one listed before that and gone now must not be adopted.
        again = _ours(service)
        for container_id in orphans:
            container = again.get(container_id)
            if container is None:
                continue
            if container.labels.get(LABEL_PLACE, "") in doomed:
                service._remove_quietly(container_id)
            elif _adopt(service, container):
                adopted.append(container_id)
    if doomed:
        left = {c.labels.get(LABEL_PLACE, "") for c in _ours(service).values()}
        for place in doomed - left:
            service.store.forget(place)
    return adopted


def started_by(service: ContainerService, place: str) -> bool:
    """Whether the engine lists a container of ``place``'s create (it raises when it cannot
    be asked)."""
    return any(c.labels.get(LABEL_PLACE) == place for c in _ours(service).values())


def reconcile(service: ContainerService) -> dict[str, list[str]]:
    """At a start: free the places of processes that are gone (a worker of the last run
    that outlives its master keeps its own), empty the last run's warm pool, take on
    orphans, drop leases whose container is gone, free ports that nothing holds."""
    stale = stale_places(service, time.time())
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
        if container.id not in _UNREADABLE:
            _UNREADABLE.add(container.id)
            log.warning("container %s carries this node's label, but its other labels "
                        "cannot be read: left as it is", container.id[:12])
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
