"""The Docker virtualization backend (docker SDK), and building the base image."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2prc_core import faults, hookimpl
from p2prc_core.containers import (
    LABEL,
    SSH_PORT,
    Backend,
    BackendContainer,
    ContainerError,
    ContainerSpec,
    HandOut,
    PortTaken,
    cannot_run_now,
)
from p2prc_core.containers import limits_environment as limits_env
from p2prc_core.text import human_bytes
from p2prc_plugins import docker_exec, docker_firewall, docker_pool
from p2prc_plugins.docker_disk import READONLY_LABEL, DiskLimit
from p2prc_plugins.nvidia_driver import find_driver

IMAGE_DIR = Path(__file__).with_name("image")
DEFAULT_TAG = "p2prc/base:latest"
# The base image's contents (the Dockerfile installs the same): sshd, python3 for Ansible,
# and what users reach for first (pip, curl, git, rsync). Bump IMAGE_VERSION when they
# change: an image with an older version is built again.
DEBOOTSTRAP_PACKAGES = ["openssh-server", "python3", "python3-pip", "sudo", "ca-certificates",
                        "curl", "git", "rsync"]
IMAGE_VERSION = "4"  # 3: the warm pool's wait for a key, an empty /job; 4: read from stdin
VERSION_LABEL = "org.p2prc.image.version"
HOST_KEY_MARK = "P2PRC-HOSTKEY "
SSHD_LISTENING = "Server listening on"  # what sshd -e says once it takes connections
LISTEN_GRACE = 5.0  # seconds to wait for it after the host key
# All that sshd needs to run, take a key login, and drop to the session: everything else is
# dropped.
SSHD_CAPABILITIES = ["CHOWN", "SETUID", "SETGID", "SYS_CHROOT", "NET_BIND_SERVICE", "KILL",
                     "AUDIT_WRITE"]  # AUDIT_WRITE: sshd logs a login on a terminal
DEFAULT_ENGINE = "unix:///var/run/docker.sock"  # where the SDK looks without DOCKER_HOST
START_HINT = "start it: as root, bash scripts/docker-engine (or 'dockerd &')"
NETWORK = "p2prc"  # every p2prc container's network: no traffic between containers
BRIDGE = "p2prc0"  # its bridge on the host; nothing from it may open a connection to the host
log = logging.getLogger("p2prc.docker")


def _docker() -> Any:
    import docker

    return docker


def engine_address() -> str:
    """Where this process asks for the Docker engine: ``DOCKER_HOST``, or its default."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE


def _os_error(err: BaseException) -> OSError | None:
    """The system error under a docker or requests error (they wrap it in their own errors
    and tuples of arguments), if there is one."""
    seen: set[int] = set()
    todo: list[object] = [err]
    while todo:
        found = todo.pop(0)
        if not isinstance(found, BaseException) or id(found) in seen:
            continue
        seen.add(id(found))
        if isinstance(found, OSError) and found.errno is not None:
            return found
        todo.extend([found.__cause__, found.__context__, *found.args])
    return None


def engine_trouble(err: BaseException) -> str:
    """Why the engine did not answer and what to do, in words for this host's owner (never
    the exception's tuple): which address was asked, what the system said, the fix."""
    where = engine_address()
    cause = _os_error(err)
    code = cause.errno if cause is not None else None
    why = {errno.ENOENT: "no such socket", errno.ECONNREFUSED: "nothing listens there",
           errno.EACCES: "permission denied (run as root, or as a member of the docker group)",
           errno.EPERM: "permission denied (run as root, or as a member of the docker group)",
           }.get(code or 0, os.strerror(code) if code else "it did not answer")
    if os.environ.get("DOCKER_HOST"):
        fix = (f"DOCKER_HOST points there: unset it, or point it at a running engine (the "
               f"default is {DEFAULT_ENGINE})")
    else:
        fix = START_HINT
    return f"The Docker engine does not answer at {where} ({why}): {fix}."


def _unavailable(err: BaseException) -> ContainerError:
    """A 503 whose fix is for this host (its log, the CLI); a peer is told only that this
    host cannot run containers now."""
    return cannot_run_now(engine_trouble(err))


def _gone() -> type[BaseException]:
    """What the SDK raises when an engine it had answered stops answering."""
    import requests

    return requests.exceptions.ConnectionError


def _start_or_remove(container: Any) -> None:
    """Start a created container; one that does not start is removed (an engine that is gone
    now leaves it to the reaper: it has no lease, and its create no live place).

    :raises ContainerError: 500 the engine refused; 503 the engine is gone.
    """
    docker = _docker()
    try:
        container.start()
    except BaseException as err:
        with contextlib.suppress(Exception):
            container.remove(force=True)
        if isinstance(err, docker.errors.APIError):
            if "port is already allocated" in str(err.explanation):
                raise PortTaken(str(err.explanation)) from None
            raise ContainerError(500, "Engine refused", f"Docker could not start the "
                                 f"container: {err.explanation}") from None
        if isinstance(err, docker.errors.DockerException | _gone()):
            raise _unavailable(err) from None
        raise


class DockerBackend:
    """Containers through the Docker engine; every one labelled, limited and unprivileged."""

    def __init__(self, client: Any = None):
        self._client = client
        self._network_ready = False
        self.disk = DiskLimit(lambda: self.client)
        self._root_dir: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            docker = _docker()
            try:
                self._client = docker.from_env(timeout=60)
                self._client.ping()
            except docker.errors.DockerException as err:
                self._client = None
                raise _unavailable(err) from None
        return self._client

    def close(self) -> None:
        """Close this process's connections to the engine (the next call opens others)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def create(self, spec: ContainerSpec) -> str:
        docker = _docker()
        self.check_free_disk(spec.min_free_disk)
        addresses = ["0.0.0.0", "::"] if spec.publish_all else ["127.0.0.1", "::1"]
        ports: dict[str, list[tuple[str, int]]] = {
            f"{SSH_PORT}/tcp": [(address, spec.ports[0]) for address in addresses]}
        for port in spec.ports[1:]:
            ports[f"{port}/tcp"] = [(address, port) for address in addresses]
        options: dict[str, Any] = {
            "image": spec.image, "name": spec.name, "detach": True, "labels": spec.labels,
            "environment": {**({"P2PRC_POOL": "1"} if spec.pool else
                               {"P2PRC_SSH_KEY": spec.ssh_key}), **limits_environment(spec)},
            "ports": ports,
            "cap_drop": ["ALL"], "cap_add": SSHD_CAPABILITIES,
            "security_opt": ["no-new-privileges:true"], "privileged": False,
            "pids_limit": spec.pids, "mem_limit": spec.memory, "memswap_limit": spec.memory,
            **(docker_pool.cpu_options(spec.cpus) if spec.pool else
               {"nano_cpus": int(spec.cpus * 1e9)}), "network": self.network(spec.reach_lan),
            "ipc_mode": "private", "init": False, "tty": False,
            "stdin_open": spec.pool,  # a pooled one reads its caller there (docker_pool)
            # What the engine keeps of its output: one file, at most log_bytes.
            "log_config": docker.types.LogConfig(type="json-file", config={
                "max-size": str(spec.log_bytes), "max-file": "1"}),
        }
        if spec.gpu:
            options.update(self.gpu_options(spec.gpus or None))
        options.pop("detach")
        try:
            # create, not run: run would try to pull a missing image from a registry.
            self.client.images.get(spec.image)
            options.update(self.disk.options(spec.image, spec.disk))
            try:
                container = self.client.containers.create(**options)
            except docker.errors.APIError as err:
                if "storage_opt" not in options or not self.disk.refused(err):
                    raise
                options.pop("storage_opt")
                options.update(self.disk.options(spec.image, spec.disk))
                container = self.client.containers.create(**options)
        except docker.errors.ImageNotFound:
            raise ContainerError(422, "No such image",
                                 f"{spec.image} is not on this host: build it with "
                                 f"'p2prc image build'.") from None
        except docker.errors.APIError as err:
            raise ContainerError(500, "Engine refused",
                                 f"Docker could not start the container: {err.explanation}") \
                from None
        except (docker.errors.DockerException, _gone()) as err:
            raise _unavailable(err) from None
        faults.point("create.created")
        _start_or_remove(container)
        return str(container.id)

    def check_free_disk(self, floor: int) -> None:
        """Refuse a create while the engine's disk (its data root) has less than ``floor``
        bytes free: a full disk stops the host, not only its guests.

        :raises ContainerError: 507, with what is free and the floor.
        """
        if floor <= 0:
            return
        if self._root_dir is None:
            try:
                info = self.client.info()
            except _gone() as err:
                raise _unavailable(err) from None
            self._root_dir = str(info.get("DockerRootDir") or "/var/lib/docker")
        try:
            stats = os.statvfs(self._root_dir)
        except OSError:
            return  # an engine on another machine (or out of our sight): its own business
        free = stats.f_bavail * stats.f_frsize
        if free < floor:
            raise ContainerError(507, "Host disk low",
                                 f"This host's disk for containers has {human_bytes(free)} "
                                 f"free, under its floor of {human_bytes(floor)}: no container "
                                 f"is started until space is freed.")

    def network(self, reach_lan: bool = True) -> str:
        """p2prc's own bridge network, made once: inter-container traffic off (one lease's
        container cannot reach another's sshd), and the host closed to new connections from
        it (a container cannot reach the host's p2prc API, or anything else the host
        serves, through the bridge's gateway or any host address), cloud metadata services
        refused, and the host's private networks too unless ``reach_lan`` (see
        ``docker_firewall``). Checked before every container starts; when the host cannot be
        closed, no container starts.

        :raises ContainerError: the network has other settings, or the firewall rule cannot
            be put in place.
        """
        docker = _docker()
        if not self._network_ready:
            try:
                options = self.client.networks.get(NETWORK).attrs.get("Options") or {}
            except docker.errors.NotFound:
                options = None
            if options is None:
                try:
                    self.client.networks.create(
                        NETWORK, driver="bridge", labels={LABEL: "1"},
                        options={"com.docker.network.bridge.enable_icc": "false",
                                 "com.docker.network.bridge.name": BRIDGE})
                except docker.errors.APIError as err:
                    if "already exists" not in str(err):
                        raise ContainerError(500, "Engine refused",
                                             f"Docker could not make the {NETWORK} network: "
                                             f"{err.explanation}") from None
            elif options.get("com.docker.network.bridge.name") != BRIDGE or \
                    options.get("com.docker.network.bridge.enable_icc") != "false":
                raise ContainerError(500, "Network misconfigured",
                                     f"The {NETWORK} network exists with other settings than "
                                     f"p2prc's (bridge {BRIDGE}, no inter-container "
                                     f"traffic): remove it with 'docker network rm "
                                     f"{NETWORK}'.")
            self._network_ready = True
        problem = docker_firewall.guard(BRIDGE, reach_lan)  # every time: a reload drops them
        if problem:
            raise ContainerError(503, "Host not closed",
                                 f"Cannot close this host to its containers ({problem}): no "
                                 f"container is started. Run the server as root where "
                                 f"iptables works.")
        return NETWORK

    def reguard(self, reach_lan: bool) -> None:
        """The firewall rules again (``docker_firewall``), for containers already running:
        a firewall reload (ufw, firewalld) drops them, and creates are not the only time
        they matter. One listing when they are in place.

        :raises ContainerError: they cannot be put back.
        """
        problem = docker_firewall.guard(BRIDGE, reach_lan)
        if problem:
            raise ContainerError(503, "Host not closed",
                                 f"Cannot close this host to its containers ({problem}).")

    def host_key(self, container_id: str, timeout: float, until: str = SSHD_LISTENING) -> str:
        """The container's SSH host key, which its entry script prints before sshd starts;
        returned once sshd says it listens (``until``: so the first connection finds it),
        or at most ``LISTEN_GRACE`` seconds after the key for an image whose sshd says
        nothing."""
        docker = _docker()
        deadline = time.monotonic() + timeout
        delay = 0.005  # a pooled container's sshd starts within a few ms of its key
        key, listening_by = None, deadline
        while time.monotonic() < deadline:
            try:
                container = self.client.containers.get(container_id)
                logs = container.logs(stdout=True, stderr=True).decode(errors="replace")
            except (docker.errors.NotFound, docker.errors.APIError):
                raise ContainerError(500, "Container vanished",
                                     f"Container {container_id[:12]} is gone, or being "
                                     f"removed.") from None
            for line in logs.splitlines():
                if key is None and line.startswith(HOST_KEY_MARK):
                    key = " ".join(line[len(HOST_KEY_MARK):].split()[:2])
                    listening_by = min(deadline, time.monotonic() + LISTEN_GRACE)
            if key is not None and (until in logs or time.monotonic() >= listening_by):
                return key
            if container.status in ("exited", "dead"):
                tail = container.logs().decode(errors="replace")[-500:]
                raise ContainerError(500, "Container failed to start",
                                     f"The container exited before sshd started: {tail}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        raise ContainerError(504, "Container too slow",
                             f"sshd did not start within {timeout:g} s.")

    def pooled_host_key(self, container_id: str, timeout: float) -> str:
        """A pooled container's host key, once it waits to be handed out."""
        return self.host_key(container_id, timeout, until=docker_pool.WAITING)

    def hand_out(self, container_id: str, given: HandOut) -> None:
        """Give a pooled container to its one caller (``docker_pool.hand_out``)."""
        docker_pool.hand_out(self.client, container_id, given)

    def exec_attach(self, container_id: str, argv: list[str], stdin: bool,
                    env: dict[str, str]) -> Any:
        """Run ``argv`` in the container, its streams on a socket (``docker_exec.attach``)."""
        try:
            return docker_exec.attach(self.client, container_id, argv, stdin, env)
        except _gone() as err:
            raise _unavailable(err) from None

    def remove(self, container_id: str) -> None:
        remove_container(self.client, container_id)

    def containers(self) -> list[BackendContainer]:
        try:
            found = self.client.containers.list(all=True, filters={"label": f"{LABEL}=1"},
                                                ignore_removed=True)  # gone meanwhile
        except _gone() as err:
            raise _unavailable(err) from None
        return [BackendContainer(c.id, c.status, _image_name(c), dict(c.labels),
                                 docker_pool.handed_out_of(c.name)) for c in found]

    def engine_version(self) -> str:
        """The engine's version (``p2prc version``), without the SDK where it can be."""
        from p2prc_plugins.docker_version import engine_version

        return engine_version(engine_address(), lambda: self.client, _unavailable)

    def images(self) -> list[dict[str, Any]]:
        try:
            found = self.client.images.list()
        except (ContainerError, _gone()):
            return []  # no engine: no images, and /v1/images still answers
        return [{"name": tag, "id": image.short_id, "size": image.attrs.get("Size", 0)}
                for image in found for tag in image.tags]

    def usage(self, container_id: str) -> dict[str, float]:
        """What the container uses now, as 'docker stats' shows it: ``cpu_percent`` (of one
        CPU: 200 is two busy CPUs) and ``memory`` (bytes, page cache left out)."""
        docker = _docker()
        try:
            stats = self.client.api.stats(container_id, stream=False)
        except docker.errors.DockerException as err:
            raise ContainerError(404, "No such container", f"{container_id[:12]}: {err}") \
                from None
        from p2prc_plugins.docker_stats import usage_of_stats

        return usage_of_stats(stats)

    def has_toolkit(self) -> bool:
        """Whether NVIDIA's container toolkit is there for the engine to use."""
        runtimes = self.client.info().get("Runtimes", {})
        return "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook") is not None

    def gpu_options(self, gpus: list[dict[str, int]] | None = None) -> dict[str, Any]:
        """How a container gets the GPUs ``gpus`` (``{"index", "minor"}`` each; every GPU
        when None): the toolkit's device request where it is installed; otherwise those
        GPUs' device nodes, the driver's control nodes, and its files, read-only.

        :raises ContainerError: 409, naming what is missing.
        """
        docker = _docker()
        if self.has_toolkit():
            if gpus is None:
                return {"device_requests": [docker.types.DeviceRequest(
                    count=-1, capabilities=[["gpu"]])]}
            return {"device_requests": [docker.types.DeviceRequest(
                device_ids=[str(g["index"]) for g in gpus], capabilities=[["gpu"]])]}
        driver, missing = find_driver()
        if driver is None:
            raise ContainerError(409, "No GPU", f"This host cannot give a GPU to containers: "
                                                f"{missing}.")
        minors = None if gpus is None else [g["minor"] for g in gpus]
        if minors is not None and len(driver.devices(minors)) - len(driver.controls) < \
                len(minors):
            raise ContainerError(409, "No GPU", f"This host has no device node for GPU "
                                                f"{', '.join(map(str, minors))} "
                                                f"(/dev/nvidiaN).")
        return {"devices": driver.devices(minors), "volumes": driver.volumes()}

    def gpu_available(self) -> bool:
        """Whether the engine can give GPUs to containers: with NVIDIA's container toolkit,
        or with the driver's device nodes and files (see ``nvidia_driver``)."""
        return self.has_toolkit() or find_driver()[0] is not None

    def build_image(self, tag: str, from_debootstrap: bool, force: bool,
                    say: Callable[[str], None]) -> bool:
        return build_image(tag, from_debootstrap, force, say)


REMOVAL_WAIT = 30.0  # seconds a removal waits for one already under way elsewhere


def remove_container(client: Any, container_id: str, wait: float = REMOVAL_WAIT) -> None:
    """Remove the container (gone already: done). One that another removal is taking away
    (the host's ``server containers kill``, the reaper, ``docker rm``) is waited for: its end
    is this one's, not an error.

    :raises ContainerError: the engine refused, or that removal did not end within ``wait``.
    """
    docker = _docker()
    try:
        client.containers.get(container_id).remove(force=True)
        return
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as err:
        if err.status_code != 409 or "in progress" not in str(err.explanation):
            raise ContainerError(500, "Engine refused",
                                 f"Docker could not remove {container_id[:12]}: "
                                 f"{err.explanation}") from None
    except _gone() as err:
        raise _unavailable(err) from None
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            client.containers.get(container_id)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as err:
            raise ContainerError(500, "Engine refused",
                                 f"Docker could not say whether {container_id[:12]} is "
                                 f"removed: {err.explanation}") from None
        except _gone() as err:
            raise _unavailable(err) from None
        time.sleep(0.1)
    raise ContainerError(500, "Engine refused", f"Docker is still removing "
                                                f"{container_id[:12]} after {wait:g} s.")


def limits_environment(spec: ContainerSpec) -> dict[str, str]:
    """``containers.limits_environment`` of the spec's limits. The base image hands them to
    SSH sessions and says them at a login; ``free`` still shows the host's memory."""
    return limits_env(spec.cpus, spec.memory)


def _image_name(container: Any) -> str:
    tags = container.attrs.get("Config", {}).get("Image")
    return str(tags or "")


@hookimpl(trylast=True)
def p2prc_register_backends(register: Callable[[str, Backend], None]) -> None:
    register("docker", DockerBackend())


# -- the base image ---------------------------------------------------------------------------

def image_state(client: Any, tag: str) -> str:
    """"missing", "outdated" (built by an older p2prc: without a read-only root, or with
    older contents than ``IMAGE_VERSION``), or "current"."""
    docker = _docker()
    try:
        labels = client.images.get(tag).labels or {}
    except docker.errors.ImageNotFound:
        return "missing"
    current = labels.get(READONLY_LABEL) == "1" and labels.get(VERSION_LABEL) == IMAGE_VERSION
    return "current" if current else "outdated"


def build_from_dockerfile(client: Any, tag: str, say: Callable[[str], None]) -> None:
    """``docker build`` of the shipped Dockerfile: needs a registry for its base image."""
    docker = _docker()
    try:
        for chunk in client.api.build(path=str(IMAGE_DIR), tag=tag, rm=True, decode=True):
            if "stream" in chunk and chunk["stream"].strip():
                say(chunk["stream"].strip())
            if "error" in chunk:
                raise ContainerError(500, "Build failed",
                                     f"{chunk['error'].strip()} (no registry? try "
                                     f"--from-debootstrap)")
    except docker.errors.DockerException as err:
        raise _unavailable(err) from None


def build_from_debootstrap(client: Any, tag: str, say: Callable[[str], None],
                           suite: str = "bookworm") -> None:
    """The same image from a Debian root filesystem, where no registry can be reached."""
    if os.geteuid() != 0:
        raise ContainerError(500, "Needs root", "debootstrap must run as root.")
    if shutil.which("debootstrap") is None:
        raise ContainerError(500, "No debootstrap",
                             "debootstrap is not installed: apt-get install -y debootstrap")
    with tempfile.TemporaryDirectory(prefix="p2prc-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        say(f"debootstrap {suite} (minbase, {', '.join(DEBOOTSTRAP_PACKAGES)}): a minute "
            f"or two")
        result = subprocess.run(
            ["debootstrap", "--variant=minbase",
             f"--include={','.join(DEBOOTSTRAP_PACKAGES)}", suite, str(root)],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise ContainerError(500, "debootstrap failed", result.stdout[-800:]
                                 + result.stderr[-800:])
        (root / "etc/ssh").mkdir(parents=True, exist_ok=True)
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        shutil.copy(IMAGE_DIR / "sshd_config", root / "etc/ssh/sshd_config_p2prc")
        entry = root / "usr/local/bin/p2prc-entry"
        shutil.copy(IMAGE_DIR / "entrypoint.sh", entry)
        entry.chmod(0o755)
        (root / "etc/profile.d").mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGE_DIR / "p2prc-limits.sh", root / "etc/profile.d/p2prc-limits.sh")
        shutil.copy(IMAGE_DIR / "pip.conf", root / "etc/pip.conf")
        for name in ("etc/profile.d/p2prc-limits.sh", "etc/pip.conf"):
            (root / name).chmod(0o644)
        (root / "job").mkdir(exist_ok=True)  # exec's working folder: a tmpfs over it
        (root / "job").chmod(0o755)
        _slim(root)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        archive = Path(tmp) / "rootfs.tar"
        say("packing the root filesystem")
        subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
        say(f"importing it as {tag}")
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(
            str(archive), repository=repository, tag=version or "latest",
            changes=['CMD ["/usr/local/bin/p2prc-entry"]', "EXPOSE 22",
                     f'LABEL org.p2prc.image="base" {READONLY_LABEL}="1" '
                     f'{VERSION_LABEL}="{IMAGE_VERSION}"'])


def _slim(root: Path) -> None:
    """Leave out of the image what debian:bookworm-slim leaves out (manuals, docs but their
    copyright files, translations) and what debootstrap keeps (the downloaded packages, apt's
    lists and caches): about 140 MB that no container uses."""
    for place in ("var/lib/apt/lists", "var/cache/apt", "usr/share/man", "usr/share/info",
                  "usr/share/locale", "usr/share/lintian"):
        shutil.rmtree(root / place, ignore_errors=True)
    docs = root / "usr/share/doc"
    for path in sorted(docs.rglob("*"), reverse=True) if docs.is_dir() else []:
        if path.is_symlink() or path.is_file():
            if path.name != "copyright":
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def build_image(tag: str = DEFAULT_TAG, from_debootstrap: bool = False, force: bool = False,
                say: Callable[[str], None] = print) -> bool:
    """Build the base image unless it exists (or ``force``); returns whether it built."""
    client = DockerBackend().client
    state = image_state(client, tag)
    if state == "current" and not force:
        say(f"{tag} exists already (--force builds it again)")
        return False
    if state == "outdated":
        say(f"{tag} was built by an older p2prc: building it again")
    if from_debootstrap:
        build_from_debootstrap(client, tag, say)
    else:
        build_from_dockerfile(client, tag, say)
    say(f"built {tag}")
    return True
