"""Containers on this host: requests, limits, the port pool, leases, and reconciling with the
engine. No engine is imported here: a backend (the Docker plugin) does the work."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2prc_core import container_recovery, faults
from p2prc_core.config import Settings, parse_port_range
from p2prc_core.errors import Refusal
from p2prc_core.leases import (
    ENDING_OWNER,
    ENDING_SECONDS,
    LABEL,
    LABEL_DIRECT,
    LABEL_EXPIRES,
    LABEL_GPUS,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_PLACE,
    LABEL_PORTS,
    MIN_MEMORY,
    PENDING,
    PENDING_SECONDS,
    POOL_OWNER,
    SSH_PORT,
    STOPPED,
    BackendContainer,
    Lease,
)
from p2prc_core.models import CONTAINER_ID
from p2prc_core.storage import SERVER_DB, SharedDB
from p2prc_core.text import human_bytes, human_duration
from p2prc_core.wire import (
    ContainerRequest,
    WireError,
    convert,
    host_key_fingerprint,
)

log = logging.getLogger("p2prc.containers")


CANNOT_RUN_NOW = "This host cannot run containers now: try another host, or this one later."


class ContainerError(Refusal):
    """A container request that cannot be met; ``status`` is its HTTP status. ``message``
    is for this host's owner (the CLI, the server's log); ``for_peers``, when given, is what
    a peer is answered instead: a host's own fix (and its engine's words) is not theirs."""

    def __init__(self, status: int, title: str, message: str, for_peers: str | None = None):
        super().__init__(message, status, title)
        self.for_peers = for_peers


def limits_environment(cpus: float, memory: int) -> dict[str, str]:
    """The limits, where a user looks for them: ``P2PRC_CPUS`` and ``P2PRC_MEMORY`` (bytes),
    and ``OMP_NUM_THREADS`` (the CPUs, rounded up), which ``nproc``, OpenMP and BLAS honour:
    without it they see every CPU of the host."""
    return {"P2PRC_CPUS": f"{cpus:g}", "P2PRC_MEMORY": str(memory),
            "OMP_NUM_THREADS": str(max(1, math.ceil(cpus)))}


class PortTaken(ContainerError):
    """The engine found a chosen host port taken after all (another host on this machine,
    or any program, took it after the port pool checked it): the create is tried again on
    other ports, never that one (``port``, where the engine named it)."""

    def __init__(self, message: str):
        super().__init__(503, "Ports taken", message)
        found = re.search(r":([0-9]{1,5}) failed", message)
        self.port = int(found.group(1)) if found else None


def cannot_run_now(why: str) -> ContainerError:
    """This host's engine does not answer: ``why`` (with its fix) is for the host; a peer
    is told only that this host cannot run containers now (503)."""
    return ContainerError(503, "Cannot run containers now", why, for_peers=CANNOT_RUN_NOW)


def parse_request(body: Any) -> ContainerRequest:
    """A caller's ``POST /v1/containers`` body, checked (``wire.ContainerRequest``).

    :raises ContainerError: 400 for anything malformed or unknown; the text names the field.
    """
    try:
        return convert(body, ContainerRequest)
    except WireError as err:
        raise ContainerError(400, "Invalid request", str(err)) from None


def parse_gpu_text(text: str) -> bool | int | list[int]:
    """What ``--gpu`` says, as a request's ``gpu``: ``all`` (every free GPU), ``N`` (a
    count), or ``I,J`` / ``device=I[,J]`` (those GPUs, by the host's index).

    :raises ValueError: anything else.
    """
    given = text.strip().lower()
    if given in ("", "all", "true", "yes"):
        return True
    indexes = given.removeprefix("device=")
    if indexes != given or "," in indexes:
        parts = [p.strip() for p in indexes.split(",") if p.strip()]
        if parts and all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
    elif given.isdigit() and int(given) > 0:
        return int(given)
    raise ValueError(f"{text!r} is not 'all', a count (2), or GPU indexes (0,1 or device=1); "
                     f"give --gpu after PEER")


@dataclass(frozen=True)
class ContainerSpec:
    """What the service asks a backend to run: limits always set, nothing else allowed."""

    name: str
    image: str
    ssh_key: str
    cpus: float
    memory: int
    pids: int
    ports: list[int]  # host port == container port; the first is SSH's
    gpu: bool
    labels: dict[str, str]
    # The GPUs given, each {"index": NVML's index, "minor": /dev/nvidiaN's N}; with gpu and
    # none listed, a backend gives every GPU.
    gpus: list[dict[str, int]] = field(default_factory=list)
    publish_all: bool = False  # ports on every host address too, not only on loopback
    disk: int = 0  # most bytes it may write (0: no limit)
    log_bytes: int = 10 << 20  # most bytes of its output the engine keeps
    min_free_disk: int = 0  # refuse to start it while the engine's disk has less free
    reach_lan: bool = True  # may open connections to the host's private networks
    pool: bool = False  # for the warm pool: no key yet; it waits to be handed out


@dataclass(frozen=True)
class HandOut:
    """What a pooled container gets when it goes to its one caller (``hand_out``)."""

    owner: str
    ssh_key: str
    cpus: float
    memory: int
    expires: float


class Backend(Protocol):
    """A virtualization backend, registered through ``p2prc_register_backends``."""

    def create(self, spec: ContainerSpec) -> str:
        """Start a container exactly as ``spec`` says; return its id."""
        ...

    def host_key(self, container_id: str, timeout: float) -> str:
        """The container's SSH host key line (``TYPE BASE64``), waiting up to ``timeout``."""
        ...

    def remove(self, container_id: str) -> None:
        """Stop and remove a container; one that is gone already is no error."""
        ...

    def containers(self) -> list[BackendContainer]:
        """Every container of p2prc's (labelled ``org.p2prc=1``) the engine has."""
        ...

    def images(self) -> list[dict[str, Any]]:
        """The images the engine holds: ``{"name", "id", "size"}`` each."""
        ...

    def gpu_available(self) -> bool:
        """Whether the engine can hand this host's GPUs to a container (the host's GPUs
        themselves come from the ``p2prc_collect_specs`` hook)."""
        ...

    def build_image(self, tag: str, from_debootstrap: bool, force: bool,
                    say: Callable[[str], None]) -> bool:
        """Build p2prc's base image under ``tag`` unless it exists (or ``force``); return
        whether it built. Optional: without it, ``p2prc image build`` says the backend
        cannot build images."""
        ...

    def exec_attach(self, container_id: str, argv: list[str], stdin: bool,
                    env: dict[str, str]) -> Any:
        """Start ``argv`` in a running container, no terminal, with ``env`` over the
        container's environment; an object with ``sock`` (its
        streams as Docker's multiplexed frames; written bytes are its stdin, a shutdown for
        writing ends that), ``exit_code()`` once they end, and ``close()``. Optional:
        without it, exec streams answer 501 and clients use SSH."""
        ...

    def usage(self, container_id: str) -> dict[str, float]:
        """What a running container uses now: ``cpu_percent`` (of one CPU) and ``memory``
        (bytes). Optional: a backend without it, or one that raises ``Refusal``, shows use
        as unknown."""
        ...


def _minor(gpu: dict[str, Any]) -> int:
    """The N of the GPU's /dev/nvidiaN: NVML's minor number where the specs have it."""
    minor = gpu.get("minor")
    return minor if isinstance(minor, int) and minor >= 0 else int(gpu["index"])


def _number(value: float) -> str:
    return f"{value:g}"


fingerprint = host_key_fingerprint  # the name the CLI knows it by


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` on this host, on IPv4 or IPv6."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((address, port))
            except OSError as err:
                if err.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
                    continue  # no IPv6 here at all
                return False
    return True


class ContainerStore:
    """Leases and the port pool in ``$P2PRC_HOME/server.db``, shared by every worker."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS ports (port INTEGER PRIMARY KEY, holder TEXT NOT NULL,
            reserved REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, owner TEXT NOT NULL,
            expires REAL NOT NULL, data TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS gpus (gpu INTEGER NOT NULL, holder TEXT NOT NULL,
            PRIMARY KEY (gpu, holder));
        CREATE TABLE IF NOT EXISTS stopped (id TEXT PRIMARY KEY, since REAL NOT NULL);
    """

    def __init__(self, home: Path, port_range: tuple[int, int]):
        self.shared = SharedDB(home / SERVER_DB, self.SCHEMA)
        self.low, self.high = port_range

    def reserve(self, owner: str, count: int, per_caller: int, holder: str,
                gpu: bool | int | tuple[int, ...] = False, host_gpus: list[int] | None = None,
                share: bool = False, gpus_per_caller: int = 0,
                avoid: set[int] | None = None) -> list[int]:
        """In one transaction (so no two requests or workers can both pass): check that
        ``owner`` holds fewer than ``per_caller`` containers (a create under way counts),
        hold a place for this one, reserve ``count`` host ports that nothing else holds and
        nothing listens on, and the GPUs ``gpu`` asks for among ``host_gpus`` (see
        ``choose_gpus``; ``gpus_of(holder)`` says which), ``owner`` holding no more than
        ``gpus_per_caller`` in all (0: no limit); never a port in ``avoid``.

        :raises ContainerError: 429 over a per-caller limit; 503 too few free ports; 409 or
            422 GPUs that cannot be given.
        """
        with self.shared.transaction() as db:
            _check_places(db, owner, per_caller)
            taken = {row[0] for row in db.execute("SELECT port FROM ports")} | (avoid or set())
            chosen: list[int] = []
            for port in range(self.low, self.high + 1):
                if port not in taken and port_is_free(port):
                    chosen.append(port)
                    if len(chosen) == count:
                        break
            if len(chosen) < count:
                raise ContainerError(503, "No free ports",
                                     f"This host's port pool ({self.low}-{self.high}) has "
                                     f"{len(chosen)} free ports; {count} are needed.")
            if gpu is not False:
                held: dict[int, int] = dict(db.execute(
                    "SELECT gpu, COUNT(*) FROM gpus GROUP BY gpu").fetchall())
                room = _gpu_room(gpu, _gpus_held_by(db, owner), gpus_per_caller)
                db.executemany("INSERT INTO gpus VALUES (?, ?)", [
                    (g, holder) for g in choose_gpus(gpu, host_gpus or [], held, share, room)])
            now = time.time()
            db.executemany("INSERT INTO ports VALUES (?, ?, ?)",
                           [(p, holder, now) for p in chosen])
            # The place held while the container starts; a crashed create's place runs out.
            db.execute("INSERT INTO leases VALUES (?, ?, ?, '{}')",
                       (holder, owner, now + PENDING_SECONDS))
            return chosen

    def settle(self, holder: str, lease: Lease) -> None:
        """The container started: its lease and ports replace the held place."""
        with self.shared.transaction() as db:
            db.execute("DELETE FROM leases WHERE id=?", (holder,))
            db.execute("UPDATE ports SET holder=? WHERE holder=?", (lease.id, holder))
            db.execute("UPDATE gpus SET holder=? WHERE holder=?", (lease.id, holder))
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                       (lease.id, lease.owner, lease.expires, json.dumps(asdict(lease))))

    def claim_pooled(self, owner: str, per_caller: int, fits: Callable[[Lease], bool],
                     given: HandOut, now: float) -> Lease | None:
        """In one transaction: take a pooled container that ``fits`` for ``owner`` (within
        ``per_caller``), its lease now ``owner``'s with ``given``'s limits and end; None when
        the pool has none. A claimed container never goes back to the pool.

        :raises ContainerError: 429 over the per-caller limit.
        """
        with self.shared.transaction() as db:
            _check_places(db, owner, per_caller)
            rows = db.execute(f"SELECT data FROM leases WHERE owner=? AND id NOT LIKE "
                              f"'{PENDING}%' AND expires > ? ORDER BY expires",
                              (POOL_OWNER, now + 60))  # never one the reaper may take now
            found = [lease for lease in (Lease(**json.loads(row[0])) for row in rows)
                     if fits(lease)]
            if not found:
                return None
            lease = found[0]
            lease.owner, lease.created, lease.expires = owner, now, given.expires
            lease.cpus, lease.memory = given.cpus, given.memory
            db.execute("UPDATE leases SET owner=?, expires=?, data=? WHERE id=?",
                       (owner, lease.expires, json.dumps(asdict(lease)), lease.id))
            return lease

    def release_pooled(self, container_id: str) -> bool:
        """Drop a pooled container's lease, ports and place, unless a caller claimed it
        meanwhile; return whether it was still the pool's."""
        with self.shared.transaction() as db:
            gone = db.execute("DELETE FROM leases WHERE id=? AND owner=?",
                              (container_id, POOL_OWNER)).rowcount
            if gone:
                for table in ("ports", "gpus"):
                    db.execute(f"DELETE FROM {table} WHERE holder=?", (container_id,))
                db.execute("DELETE FROM stopped WHERE id=?", (container_id,))
            return bool(gone)

    def end(self, container_id: str, owner: str, now: float) -> bool:
        """``owner``'s place of a container given back at once: the store holds it for
        ``ENDING_OWNER`` (the lease still names ``owner``, for the host to see), running out
        ``ENDING_SECONDS`` from ``now``; its ports and GPUs stay held until it is forgotten.
        Whether it was ``owner``'s."""
        with self.shared.transaction() as db:
            row = db.execute("SELECT data FROM leases WHERE id=? AND owner=?",
                             (container_id, owner)).fetchone()
            if row is None:
                return False
            lease = Lease(**json.loads(row[0]))
            lease.expires = now + ENDING_SECONDS
            db.execute("UPDATE leases SET owner=?, expires=?, data=? WHERE id=?",
                       (ENDING_OWNER, lease.expires, json.dumps(asdict(lease)), container_id))
            return True

    def pool_places(self) -> int:
        """The warm pool's containers, those being started included."""
        row = self.shared.db().execute("SELECT COUNT(*) FROM leases WHERE owner=?",
                                       (POOL_OWNER,)).fetchone()
        return int(row[0])

    def forget(self, holder: str) -> None:
        """Drop a lease (or a held place) and free its ports and GPUs."""
        with self.shared.transaction() as db:
            db.execute("DELETE FROM leases WHERE id=?", (holder,))
            db.execute("DELETE FROM ports WHERE holder=?", (holder,))
            db.execute("DELETE FROM gpus WHERE holder=?", (holder,))
            db.execute("DELETE FROM stopped WHERE id=?", (holder,))

    def note_stopped(self, stopped: set[str], now: float) -> dict[str, float]:
        """Record that the containers ``stopped`` are seen stopped (from ``now``, unless seen
        so before) and that no others are; return when each was first seen so."""
        with self.shared.transaction() as db:
            before = self._stopped(db)
            db.executemany("DELETE FROM stopped WHERE id=?",
                           [(i,) for i in set(before) - stopped])
            db.executemany("INSERT OR IGNORE INTO stopped VALUES (?, ?)",
                           [(i, now) for i in stopped])
            return self._stopped(db)

    def stopped_since(self) -> dict[str, float]:
        """When each container last seen stopped by the reaper was first seen so."""
        return self._stopped(self.shared.db())

    @staticmethod
    def _stopped(db: sqlite3.Connection) -> dict[str, float]:
        return dict(db.execute("SELECT id, since FROM stopped").fetchall())

    def held_ports(self) -> dict[int, str]:
        return dict(self.shared.db().execute("SELECT port, holder FROM ports").fetchall())

    def gpu_holders(self) -> dict[int, list[str]]:
        """Each held GPU's index and who holds it (containers, or creates under way)."""
        found: dict[int, list[str]] = {}
        for gpu, holder in self.shared.db().execute(
                "SELECT gpu, holder FROM gpus ORDER BY gpu, holder"):
            found.setdefault(gpu, []).append(holder)
        return found

    def gpus_of(self, holder: str) -> list[int]:
        return [row[0] for row in self.shared.db().execute(
            "SELECT gpu FROM gpus WHERE holder=? ORDER BY gpu", (holder,))]

    def holders(self) -> set[str]:
        """Whoever holds a port or a GPU."""
        return {row[0] for row in self.shared.db().execute(
            "SELECT holder FROM ports UNION SELECT holder FROM gpus")}

    def adopt(self, lease: Lease) -> None:
        """Take on a running container found by its labels: its lease and its ports."""
        with self.shared.transaction() as db:
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                       (lease.id, lease.owner, lease.expires, json.dumps(asdict(lease))))
            db.executemany("INSERT OR REPLACE INTO ports VALUES (?, ?, ?)",
                           [(p["external"], lease.id, time.time()) for p in lease.ports])
            db.executemany("INSERT OR REPLACE INTO gpus VALUES (?, ?)",
                           [(g, lease.id) for g in lease.gpus])

    def leases(self, owner: str | None = None) -> list[Lease]:
        """Containers' leases (places held by creates under way are not leases)."""
        query: str = f"SELECT data FROM leases WHERE id NOT LIKE '{PENDING}%'"
        args: tuple[str, ...] = ()
        if owner is not None:
            query, args = query + " AND owner=?", (owner,)
        return [Lease(**json.loads(row[0])) for row in self.shared.db().execute(query, args)]

    def lease_ids(self) -> set[str]:
        return {row[0] for row in self.shared.db().execute("SELECT id FROM leases")}

    def places(self) -> dict[str, bool]:
        """The places held while containers start: id -> whether it is doomed."""
        return {row[0]: row[1] == container_recovery.DOOMED for row in self.shared.db().execute(
            f"SELECT id, data FROM leases WHERE id LIKE '{PENDING}%'")}

    def doom(self, place: str) -> None:
        """Mark a place doomed (``container_recovery``): it is freed once nothing of its
        create is left, and it never runs out by time."""
        with self.shared.transaction() as db:
            db.execute("UPDATE leases SET data=?, expires=? WHERE id=?",
                       (container_recovery.DOOMED, float("inf"), place))

    def stale_places(self, now: float) -> list[str]:
        rows = self.shared.db().execute(
            f"SELECT id FROM leases WHERE id LIKE '{PENDING}%' AND expires < ?", (now,))
        return [row[0] for row in rows]


def choose_gpus(ask: bool | int | tuple[int, ...], host: list[int], held: dict[int, int],
                share: bool, room: int | None = None) -> list[int]:
    """Which of the host's GPUs (``host``: their indexes) to give for ``ask`` (True: every
    free one, at least one, and at most ``room`` where it is given; a count; or those
    indexes), when ``held`` says how many holders each has. Unless ``share``, a GPU has one
    holder at a time; with it, the least held are given first.

    :raises ContainerError: 409 none, or too few, free; 422 more, or others, than the host
        has.
    """
    if not host:
        raise ContainerError(409, "No GPU", "This host has no NVIDIA GPU.")
    listing = f"this host has {_count(len(host), 'GPU')} ({_indexes(host)})"
    free = sorted(host, key=lambda g: (held.get(g, 0), g)) if share else \
        [g for g in sorted(host) if not held.get(g)]
    if isinstance(ask, tuple):
        missing = [g for g in ask if g not in host]
        if missing:
            raise ContainerError(422, "No such GPU", f"No GPU {_indexes(missing)} here: "
                                                     f"{listing}.")
        taken = [g for g in ask if g not in free]
        if taken:
            raise ContainerError(409, "GPU taken",
                                 f"GPU {_indexes(taken)} {'is' if len(taken) == 1 else 'are'} "
                                 f"held by another container; free now: "
                                 f"{_indexes(free) or 'none'}.")
        return list(ask)
    if ask is True:
        if not free:
            raise ContainerError(409, "GPUs all taken",
                                 f"All of this host's GPUs are held by other containers "
                                 f"({listing}); try later.")
        return sorted(free[:room])
    if ask > len(host):
        raise ContainerError(422, "Too many GPUs", f"{_count(ask, 'GPU')} asked for: "
                                                   f"{listing}.")
    if len(free) < ask:
        raise ContainerError(409, "GPUs taken",
                             f"{_count(ask, 'GPU')} asked for, {len(free)} free now "
                             f"({listing}; the others are held by other containers).")
    return sorted(free[:ask])


def _check_places(db: sqlite3.Connection, owner: str, per_caller: int) -> None:
    """:raises ContainerError: 429 when ``owner`` holds ``per_caller`` places already."""
    places = db.execute("SELECT COUNT(*) FROM leases WHERE owner=?", (owner,)).fetchone()
    if places[0] >= per_caller:
        raise ContainerError(429, "Too many containers",
                             f"You hold {per_caller} containers here, this host's limit per "
                             f"caller: remove one first.")


def _gpus_held_by(db: sqlite3.Connection, owner: str) -> int:
    """The GPUs ``owner``'s containers and creates under way hold (one a container each)."""
    row = db.execute("SELECT COUNT(*) FROM gpus WHERE holder IN "
                     "(SELECT id FROM leases WHERE owner=?)", (owner,)).fetchone()
    return int(row[0])


def _gpu_room(ask: bool | int | tuple[int, ...], held: int, limit: int) -> int | None:
    """How many more GPUs a caller who holds ``held`` may take under ``limit`` (0: no limit,
    and None back).

    :raises ContainerError: 429 when ``ask`` wants more than that.
    """
    if not limit:
        return None
    wanted = len(ask) if isinstance(ask, tuple) else 1 if ask is True else int(ask)
    if held + wanted > limit:
        hint = "remove a container that holds one first" if held else \
            f"ask for at most {limit}"
        raise ContainerError(429, "Over the GPU limit",
                             f"{_count(wanted, 'GPU')} asked for and {held} held here: over "
                             f"this host's limit of {_count(limit, 'GPU')} per caller "
                             f"(gpus_per_caller); {hint}.")
    return limit - held


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _indexes(gpus: list[int] | tuple[int, ...]) -> str:
    return ", ".join(str(g) for g in gpus)


class PoolTaker(Protocol):
    """The host's warm pool as the service sees it (``p2prc_core.warm_pool``)."""

    def take(self, owner: str, request: ContainerRequest, given: HandOut,
             granted_image: str) -> Lease | None:
        """A pooled container of ``granted_image`` handed out to ``owner`` with ``given``;
        None: start one."""
        ...


@dataclass
class ContainerService:
    """The server's side: create, list, remove, reap and reconcile p2prc's containers."""

    settings: Settings
    backend: Backend
    store: ContainerStore
    node_id: str
    gpus: Callable[[], list[Any]] = field(default=list)  # this host's GPUs (from the specs)
    host_key_timeout: float = 30.0
    pool: PoolTaker | None = None  # the warm pool, on a host that keeps one

    @classmethod
    def open(cls, settings: Settings, backend: Backend, home: Path, node_id: str,
             gpus: Callable[[], list[Any]] = list) -> ContainerService:
        store = ContainerStore(home, parse_port_range(settings.port_range))
        return cls(settings, backend, store, node_id, gpus)

    # -- create ------------------------------------------------------------------------------

    def granted(self, request: ContainerRequest) -> tuple[str, float, int, int]:
        """What this host gives for ``request``: image, CPUs, memory and time to live, the
        host's defaults filling what it left out.

        :raises ContainerError: 422 over a limit or an image not offered; 409 no GPU.
        """
        s = self.settings
        image = request.image or s.container_images[0]
        if image not in s.container_images:
            raise ContainerError(422, "Image not offered",
                                 f"This host offers {', '.join(s.container_images)}; "
                                 f"not {image}.")
        cpus = request.cpus if request.cpus is not None else s.container_default_cpus
        memory = request.memory if request.memory is not None else s.container_default_memory
        ttl = request.ttl if request.ttl is not None else s.container_default_ttl
        if memory < MIN_MEMORY:
            raise ContainerError(422, "Under a limit",
                                 f"memory {memory} bytes is below this host's minimum of "
                                 f"{MIN_MEMORY >> 20} MiB.")
        for name, value, limit, say in (("cpus", cpus, s.container_max_cpus, _number),
                                        ("memory", memory, s.container_max_memory,
                                         human_bytes),
                                        ("ports", request.ports, s.container_max_ports,
                                         _number),
                                        ("ttl", ttl, s.container_max_ttl, human_duration)):
            if value > limit:
                raise ContainerError(422, "Over a limit",
                                     f"{name} {say(value)} is over this host's limit of "
                                     f"{say(limit)}.")
        if request.gpu is not False and not self.gpus():
            raise ContainerError(409, "No GPU", "This host has no NVIDIA GPU.")
        if request.gpu is not False and not self.backend.gpu_available():
            raise ContainerError(409, "No GPU",
                                 "This host has an NVIDIA GPU, but its engine cannot give it to "
                                 "containers (no NVIDIA container toolkit).")
        return image, cpus, memory, ttl

    def create(self, owner: str, request: ContainerRequest) -> Lease:
        """Start a container for ``owner`` (or hand one out from the warm pool): within the
        limits, on ports from the port pool, with a lease; a create that fails half-way
        leaves nothing behind."""
        image, cpus, memory, ttl = self.granted(request)
        if self.pool is not None:
            given = HandOut(owner, request.ssh_key, cpus, memory, time.time() + ttl)
            lease = self.pool.take(owner, request, given, image)
            if lease is not None:
                return lease
        avoid: set[int] = set()
        while True:
            try:
                return self._start(owner, request, (image, cpus, memory, ttl),
                                   self.settings.containers_per_caller, avoid)
            except PortTaken as err:  # nothing of it is left: other ports, while tries last
                if err.port is None or err.port in avoid or len(avoid) == 2:
                    raise
                avoid.add(err.port)
                log.info("a port was taken as the container started (%s); trying others", err)

    def start_pooled(self, size: int) -> Lease:
        """Start one container for the warm pool (of at most ``size``): the default image
        and limits, SSH's port only, no key; its lease is ``POOL_OWNER``'s.

        :raises ContainerError: 429 when the pool is full, or why it cannot start.
        """
        s = self.settings
        granted = (s.container_images[0], s.container_default_cpus,
                   s.container_default_memory, s.container_default_ttl)
        return self._start(POOL_OWNER, None, granted, size)

    def _start(self, owner: str, request: ContainerRequest | None,
               granted: tuple[str, float, int, int], per_caller: int,
               avoid: set[int] | None = None) -> Lease:
        """Start a container (``request`` None: a pooled one) and settle its lease."""
        s = self.settings
        image, cpus, memory, ttl = granted
        pooled = request is None
        extra, gpu = (0, False) if request is None else (request.ports, request.gpu)
        token = container_recovery.place_token(uuid.uuid4().hex)
        # Each GPU by its index (a specs plugin that gives none: its place in the list).
        host_gpus = {g["index"] if isinstance(g.get("index"), int) else i: {"index": i, **g}
                     for i, g in enumerate(self.gpus()) if isinstance(g, dict)} \
            if gpu is not False else {}
        ports = self.store.reserve(owner, 1 + extra, per_caller, token, gpu,
                                   sorted(host_gpus), s.gpu_share, s.gpus_per_caller,
                                   avoid or set())
        faults.point("create.reserved")
        gpus = self.store.gpus_of(token)
        now = time.time()
        direct = s.publish_ports == "all"
        lease = Lease(id="", owner=owner, image=image, created=now, expires=now + ttl,
                      gpu=bool(gpus), gpus=gpus, cpus=cpus, memory=memory, direct=direct,
                      ports=[{"name": "ssh", "internal": SSH_PORT, "external": ports[0]}]
                      + [{"name": f"port{i}", "internal": p, "external": p}
                         for i, p in enumerate(ports[1:], 1)])
        spec = ContainerSpec(
            name=f"p2prc-{'pool-' if pooled else ''}{uuid.uuid4().hex[:12]}", image=image,
            ssh_key="" if request is None else request.ssh_key, pool=pooled,
            cpus=cpus, memory=memory, pids=s.container_pids, ports=ports, gpu=bool(gpus),
            labels={LABEL: "1", LABEL_OWNER: owner, LABEL_EXPIRES: str(int(lease.expires)),
                    LABEL_NODE: self.node_id, LABEL_PLACE: token,
                    LABEL_PORTS: json.dumps(lease.ports, separators=(",", ":")),
                    **({LABEL_GPUS: json.dumps(gpus)} if gpus else {}),
                    **({LABEL_DIRECT: "1"} if direct else {})},
            gpus=[{"index": g, "minor": _minor(host_gpus[g])} for g in gpus],
            publish_all=direct, disk=s.container_disk, log_bytes=s.container_log_bytes,
            min_free_disk=s.min_free_disk, reach_lan=s.containers_reach_lan)
        container_id = ""
        try:
            container_id = self.backend.create(spec)
            lease.id = container_id
            faults.point("create.started")
            wait = getattr(self.backend, "pooled_host_key", None) if pooled else None
            lease.host_key = (wait or self.backend.host_key)(container_id,
                                                             self.host_key_timeout)
            self.store.settle(token, lease)
        except BaseException:
            self._give_up(token, container_id)
            raise
        faults.point("create.settled")
        return lease

    # -- find, list, remove ------------------------------------------------------------------

    def find(self, container_id: str, owner: str | None) -> Lease:
        """The lease for ``container_id`` (a full id or a 12+ character prefix).

        Only ``owner``'s are looked at (``None``: the host, every one), so another owner's
        container answers as an unknown one does: nothing tells that it exists, nor its id.

        :raises ContainerError: 400 malformed id; 404 none (of ``owner``'s) or several.
        """
        if not isinstance(container_id, str) or not CONTAINER_ID.fullmatch(container_id):
            raise ContainerError(400, "Invalid id",
                                 "A container id is 12 to 64 lower-case hex characters.")
        found = [lease for lease in self.store.leases(owner)
                 if lease.id.startswith(container_id)]
        if len(found) != 1:
            raise ContainerError(404, "No such container",
                                 "No p2prc container of yours has that id on this host."
                                 if owner is not None else
                                 f"No p2prc container {container_id} on this host.")
        return found[0]

    def list_leases(self, owner: str | None = None) -> list[Lease]:
        live = {c.id: c.state for c in self.backend.containers()}
        leases = self.store.leases(owner)
        for lease in leases:
            lease.state = live.get(lease.id, "gone")
        return sorted(leases, key=lambda lease: lease.created)

    def freed_at(self) -> dict[str, tuple[float, float]]:
        """Each container the reaper saw stopped: since when, and when it will be removed
        (``container_exited_grace`` later, at the reaper's next pass)."""
        grace = self.settings.container_exited_grace
        return {i: (since, since + grace) for i, since in self.store.stopped_since().items()}

    def remove(self, container_id: str, owner: str | None) -> Lease:
        """Stop and remove a container; ``owner=None`` is the host, who may remove any."""
        lease = self.find(container_id, owner)
        self.backend.remove(lease.id)
        self.store.forget(lease.id)
        return lease

    def give_back(self, container_id: str, owner: str) -> None:
        """``owner``'s place of a container it is done with given back now
        (``ContainerStore.end``), before the container is removed (``remove`` with the
        host as owner): a caller told of the end once this is done may start its next
        container at once, not after the engine's removal. Where the removal fails, the
        reaper removes it once its lease has run out (``ENDING_SECONDS``)."""
        if not self.store.end(container_id, owner, time.time()):
            raise ContainerError(404, "No such container",
                                 "No p2prc container of yours has that id on this host.")

    def _remove_quietly(self, container_id: str) -> bool:
        """Remove a container, saying whether it is gone (False: the engine failed)."""
        try:
            self.backend.remove(container_id)
        except Exception:  # noqa: BLE001 - cleaning up after a failure; the first error wins
            return False
        return True

    def _give_up(self, token: str, container_id: str) -> None:
        """After a create failed: remove what it started and free its place; where the
        engine cannot tell that nothing of it is left, the place is doomed instead (the
        caller was told no: ``container_recovery`` removes it, never adopts it)."""
        try:
            gone = (not container_id or self._remove_quietly(container_id)) and \
                not container_recovery.started_by(self, token)
        except Exception:  # noqa: BLE001 - the engine cannot be asked: not known to be gone
            gone = False
        with contextlib.suppress(Exception):  # a full disk: the place runs out in time
            (self.store.forget if gone else self.store.doom)(token)

    # -- the host's housekeeping -------------------------------------------------------------

    def reap(self, now: float | None = None) -> list[str]:
        """Remove every container whose lease has run out (their ids are returned), and each
        that stopped (``STOPPED``) ``container_exited_grace`` ago or more (logged here):
        their ports, GPUs and places are free again."""
        now = now if now is not None else time.time()
        expired = [lease.id for lease in self.store.leases() if lease.expires <= now]
        ending = {lease.id for lease in self.store.leases(ENDING_OWNER)}
        for container_id in expired:
            if not self._remove_quietly(container_id) and container_id in ending:
                continue  # kept to try again: with no lease, a restart would adopt it back
            self.store.forget(container_id)
        # A create that died half-way: what it started is adopted or removed, its place
        # freed (container_recovery).
        stale = container_recovery.stale_places(self, now)
        try:
            container_recovery.take_on_orphans(self, stale)
        except Exception as err:  # noqa: BLE001 - no engine now: the places wait for it
            log.warning("cannot take on the containers left by a create now: %s", err)
            stale = [p for p in stale if p in self.store.stale_places(now)]
        for place in stale:
            self.store.forget(place)
        self._reap_stopped(now)
        self._reguard()
        return expired

    def _reguard(self) -> None:
        """Put back the rules that keep containers in (a firewall reload drops them), while
        any runs: a backend that has such rules says how (``reguard``)."""
        reguard = getattr(self.backend, "reguard", None)
        if reguard is None or not self.store.leases():
            return
        try:
            reguard(self.settings.containers_reach_lan)
        except ContainerError as err:
            log.warning("containers run without their firewall rules: %s", err)

    def _reap_stopped(self, now: float) -> None:
        # The leases are read before the engine's list, so that one settled in between is
        # not taken for gone.
        leases = {lease.id: lease for lease in self.store.leases()}
        try:
            live = {c.id: c.state for c in self.backend.containers()}
        except Exception as err:  # noqa: BLE001 - no engine now: none is known to have stopped
            log.warning("cannot ask the engine which containers stopped: %s", err)
            return
        states = {i: live.get(i, "gone") for i in leases}
        since = self.store.note_stopped({i for i, s in states.items() if s in STOPPED}, now)
        for container_id, first_seen in since.items():
            if now - first_seen < self.settings.container_exited_grace:
                continue
            self._remove_quietly(container_id)
            self.store.forget(container_id)
            log.info("container %s of %s stopped (%s) %s ago and was removed; its ports, "
                     "GPUs and place are free", container_id[:12], leases[container_id].owner,
                     states[container_id], human_duration(now - first_seen))

    def reconcile(self) -> dict[str, list[str]]:
        """Make the leases agree with the engine after a restart
        (``container_recovery.reconcile``): adopt this node's labelled containers that have
        no lease, drop leases whose container is gone, free places and ports that nothing
        holds."""
        return container_recovery.reconcile(self)


def usage_of(backend: Backend, container_ids: list[str]) -> dict[str, dict[str, float]]:
    """Each running container's CPU and memory use now, asked of the engine all at once (a
    container whose use the backend cannot tell is left out)."""
    from concurrent.futures import ThreadPoolExecutor

    measure = getattr(backend, "usage", None)  # a plugin's backend may not measure
    if measure is None or not container_ids:
        return {}

    def one(container_id: str) -> tuple[str, dict[str, float] | None]:
        try:
            return container_id, measure(container_id)
        except Refusal:
            return container_id, None

    with ThreadPoolExecutor(max_workers=min(16, len(container_ids))) as pool:
        return {k: v for k, v in pool.map(one, container_ids) if v is not None}
