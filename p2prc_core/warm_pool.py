"""The host's warm pool (``container_warm_pool``): containers of the default image started
before anyone asks, so that a caller's touch (or ``p2prc exec``) skips the start.

A pooled container runs hardened and limited like any other, with SSH's port published, but
without sshd and without a key: its entry script waits for the host to hand it out. Its lease
in the store is ``POOL_OWNER``'s until one caller claims it, in one transaction shared by
every worker of the server; then it is that caller's for good and is removed with its lease
like any other. Nothing of one caller can reach the next, because a pooled container is
handed out once and never goes back to the pool. The backend applies the caller's limits,
gives the key, and records the owner on the container (its labels, which cannot change,
keep saying "pool"), so that a restart that lost the store can tell. Each hand-out starts a
replacement in the background; the server's reap job tops the pool up and removes pooled
containers that died; a start removes the last run's pool (``ContainerService.reconcile``).
"""

from __future__ import annotations

import logging
import threading
import time

from p2prc_core.containers import (
    POOL_OWNER,
    STOPPED,
    ContainerError,
    ContainerRequest,
    ContainerService,
    HandOut,
    Lease,
)
from p2prc_core.errors import Refusal

log = logging.getLogger("p2prc.containers")


def can_pool(service: ContainerService) -> bool:
    """Whether the service's backend can hand pooled containers out."""
    return all(hasattr(service.backend, name) for name in ("hand_out", "pooled_host_key"))


class WarmPool:
    """Keeps ``size`` pooled containers started, and hands each out to one caller."""

    def __init__(self, service: ContainerService, size: int):
        self.service = service
        self.size = size
        self._filling = threading.Lock()  # one fill at a time in this process
        self._last_problem = ""

    def fits(self, request: ContainerRequest, image: str) -> bool:
        """Whether a pooled container can serve ``request``: the default image, no GPU, and
        no port but SSH's (ports are published when a container starts)."""
        return (request.gpu is False and request.ports == 0
                and image == self.service.settings.container_images[0])

    def take(self, owner: str, request: ContainerRequest, given: HandOut,
             granted_image: str) -> Lease | None:
        """Hand a pooled container to ``owner``, with ``given``'s key, limits and end; None
        when none fits or the hand-out failed (that container is removed): then the
        caller's container is started as without a pool. ``granted_image`` is the image
        the request was granted (``ContainerService.granted``): only the default one is
        pooled.

        :raises ContainerError: 429 over the per-caller limit.
        """
        image = self.service.settings.container_images[0]
        if granted_image != image or not self.fits(request, granted_image):
            return None
        store = self.service.store
        lease = store.claim_pooled(owner, self.service.settings.containers_per_caller,
                                   lambda pooled: pooled.image == image
                                   and len(pooled.ports) == 1, given, time.time())
        if lease is None:
            self.refill_soon()
            return None
        try:
            self.service.backend.hand_out(lease.id, given)  # type: ignore[attr-defined]
            host_key = self.service.backend.host_key(lease.id, self.service.host_key_timeout)
            if host_key != lease.host_key:
                raise ContainerError(500, "Host key changed",
                                     "the pooled container's sshd has another host key")
        except Exception as err:  # noqa: BLE001 - any failure: the caller gets a fresh one
            log.warning("pooled container %s could not be handed out (%s): starting one "
                        "instead", lease.id[:12], err)
            self._remove(lease.id)
            store.forget(lease.id)
            return None
        finally:
            self.refill_soon()  # after the hand-out, so the two do not slow each other
        return lease

    def refill_soon(self) -> None:
        """Top the pool up in the background (after a hand-out)."""
        threading.Thread(target=self.refill, name="p2prc-warm-pool", daemon=True).start()

    def refill(self) -> int:
        """Remove pooled containers that died, then start containers until the pool holds
        ``size`` (every worker's together); return how many started."""
        started = 0
        with self._filling:
            self.remove_dead()
            while self.service.store.pool_places() < self.size:
                try:
                    self.service.start_pooled(self.size)
                except ContainerError as err:
                    if err.status != 429:  # 429: another worker filled it meanwhile
                        self._say(f"the warm pool cannot start a container: {err}")
                    break
                started += 1
        if started:
            self._last_problem = ""
        return started

    def remove_dead(self) -> list[str]:
        """Remove the pooled containers that stopped or are gone (no grace: nobody's)."""
        pooled = self.service.store.leases(POOL_OWNER)
        if not pooled:
            return []
        try:
            live = {c.id: c.state for c in self.service.backend.containers()}
        except Refusal as err:
            self._say(f"the warm pool cannot ask the engine: {err}")
            return []
        dead = [lease.id for lease in pooled if live.get(lease.id, "gone") in STOPPED]
        for container_id in dead:
            if self.service.store.release_pooled(container_id):
                self._remove(container_id)
        return dead

    def drain(self) -> list[str]:
        """Remove every container still in the pool (the server stops)."""
        removed = []
        for lease in self.service.store.leases(POOL_OWNER):
            if self.service.store.release_pooled(lease.id):
                self._remove(lease.id)
                removed.append(lease.id)
        return removed

    def _say(self, problem: str) -> None:
        """Log a problem once, not at every reap."""
        if problem != self._last_problem:
            log.warning("%s", problem)
            self._last_problem = problem

    def _remove(self, container_id: str) -> None:
        try:
            self.service.backend.remove(container_id)
        except Exception as err:  # noqa: BLE001 - the reaper or the next start removes it
            log.warning("pooled container %s was not removed: %s", container_id[:12], err)
