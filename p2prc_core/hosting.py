"""The containers this node hosts for its peers: the configured virtualization backend and
the container service over it (leases, ports, GPUs), built on first use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from p2prc_core.config import Settings, parse_port_range
from p2prc_core.containers import (
    Backend,
    ContainerError,
    ContainerService,
    ContainerStore,
    Lease,
)
from p2prc_core.errors import P2PRCError
from p2prc_core.models import MIN_PREFIX
from p2prc_core.plugins import PluginHooks
from p2prc_core.storage import SERVER_DB
from p2prc_core.warm_pool import WarmPool, can_pool

log = logging.getLogger("p2prc.containers")


class Hosting:
    """This host's backend and container service. ``node_id`` gives this node's id (its key
    is made only when the service is built); ``gpus`` lists this machine's GPUs."""

    def __init__(self, settings: Settings, home: Path, hooks: PluginHooks,
                 node_id: Callable[[], str], gpus: Callable[[], list[Any]]):
        self.settings = settings
        self.home = home
        self.hooks = hooks
        self.node_id = node_id
        self.gpus = gpus
        self._service: ContainerService | None = None
        self._lock = threading.Lock()  # gunicorn's threads build the service once

    @cached_property
    def store(self) -> ContainerStore:
        return ContainerStore(self.home, parse_port_range(self.settings.port_range))

    @cached_property
    def backends(self) -> dict[str, Backend]:
        return self.hooks.backends()

    def backend(self) -> Backend:
        """The configured virtualization backend.

        :raises ContainerError: 503 when it is not installed or was disabled.
        """
        backend = self.backends.get(self.settings.backend)
        if backend is None:
            raise ContainerError(503, "No backend",
                                 f"The {self.settings.backend!r} backend is not installed or "
                                 f"was disabled: this host runs no containers.")
        return backend

    def let_go(self) -> None:
        """Close this process's connections to the engine (where the backend keeps any and
        was built): the server's master does before it forks its workers."""
        if "backends" in self.__dict__:  # (built: cached_property keeps it there)
            close = getattr(self.backends.get(self.settings.backend), "close", None)
            if close is not None:
                close()

    def service(self) -> ContainerService:
        """The host's container service over the configured backend (built on first use)."""
        with self._lock:
            if self._service is None:
                self._service = ContainerService(self.settings, self.backend(), self.store,
                                                 self.node_id(), self.gpus)
                self._service.pool = self._warm_pool(self._service)
            return self._service

    def _warm_pool(self, service: ContainerService) -> WarmPool | None:
        """The warm pool, where ``container_warm_pool`` asks for one and the backend can."""
        if self.settings.container_warm_pool <= 0:
            return None
        if not can_pool(service):
            log.warning("the %r backend cannot keep a warm pool: container_warm_pool is "
                        "ignored", self.settings.backend)
            return None
        return WarmPool(service, self.settings.container_warm_pool)

    def warm_pool(self) -> WarmPool | None:
        """The warm pool of this host's container service (None: it keeps none)."""
        pool = self.service().pool
        return pool if isinstance(pool, WarmPool) else None

    def reap(self) -> list[str]:
        """Remove the containers whose lease ran out, and top the warm pool up; none when
        there is no engine."""
        try:
            removed = self.service().reap()
            pool = self.warm_pool()
            if pool is not None:
                pool.refill()
            return removed
        except ContainerError:
            return []

    def drain_pool(self) -> list[str]:
        """Remove the warm pool's containers (the server stops); their ids."""
        if not self.settings.container_warm_pool:
            return []  # none kept: the engine is not even asked
        try:
            pool = self.warm_pool()
            removed = pool.drain() if pool is not None else []
            if removed:
                log.info("the warm pool's %d containers were removed", len(removed))
            return removed
        except ContainerError as err:
            log.warning("the warm pool was left to the next start: %s", err)
            return []

    def kill(self, text: str) -> Lease:
        """Stop and remove a container here, whoever owns it (the host's right), by its id
        or a unique start of it (``MIN_PREFIX``+ characters, as ``p2prc rm`` takes).

        :raises P2PRCError: too short, or the start of several ids; ContainerError: 404 when
            no container here has it.
        """
        service = self.service()
        text = text.strip().lower()
        if len(text) < MIN_PREFIX:
            raise P2PRCError(f"{text!r}: give at least {MIN_PREFIX} characters of the "
                             f"container's id")
        found = [lease.id for lease in service.list_leases() if lease.id.startswith(text)]
        if len(found) > 1:
            raise P2PRCError(f"{text!r} is the start of {len(found)} containers' ids: give "
                             f"more of it")
        return service.remove(found[0] if found else text, owner=None)

    def gpu_holders(self) -> dict[int, list[str]]:
        """Which containers (or creates under way) hold each held GPU of this host's."""
        if not (self.home / SERVER_DB).exists():
            return {}  # this node never ran a container
        return self.store.gpu_holders()
