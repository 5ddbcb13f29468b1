"""What a host keeps of each container it runs (a ``Lease``), how it labels them in the engine,
and how the engine describes them (``BackendContainer``). Below ``containers`` and
``container_recovery``, which both use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from p2prc_core.wire import ContainerReply, PortMapping, SshLogin, host_key_fingerprint

LABEL = "org.p2prc"  # every p2prc container carries LABEL=1 and the labels below
LABEL_OWNER = "org.p2prc.owner"
LABEL_EXPIRES = "org.p2prc.expires"
LABEL_PORTS = "org.p2prc.ports"
LABEL_NODE = "org.p2prc.node"
LABEL_GPUS = "org.p2prc.gpus"
LABEL_DIRECT = "org.p2prc.direct"  # "1": published on every host address
# The place its create held (PENDING + the creating process's id + "-" + a unique part):
# a container with no lease whose place no live process holds is an orphan
# (``container_recovery``).
LABEL_PLACE = "org.p2prc.place"
# The owner of a container in the host's warm pool: started before any caller asked, its
# label says so for good (labels cannot change); the store holds the caller it went to.
POOL_OWNER = "pool"
# The owner (in the store; the lease itself still names its caller) of an exec's container
# while the host removes it: its caller, who asked for that and has the exit, holds no place
# of it any more. Its ports and GPUs stay held until it is gone; its lease runs out
# ENDING_SECONDS later, when the reaper removes it if the host's own removal did not.
ENDING_OWNER = "ending"
ENDING_SECONDS = 60
SSH_PORT = 22
PENDING = "pending-"  # ids of the places held while a container starts
PENDING_SECONDS = 600
MIN_MEMORY = 16 << 20  # below this the engine refuses to start a container, or sshd dies
# What the engine says of a container whose main process ended (it exited, or the kernel
# killed it for memory), and what a lease's container is when the engine has it no more.
STOPPED = ("exited", "dead", "gone")


@dataclass
class BackendContainer:
    id: str
    state: str
    image: str
    labels: dict[str, str]
    # A pooled container handed out: the owner and the end of the lease the backend recorded
    # on it (its labels still say "pool"), so a restart that lost the store can tell.
    handed_out: tuple[str, float] | None = None


@dataclass
class Lease:
    id: str
    owner: str
    image: str
    ports: list[dict[str, Any]]
    created: float
    expires: float
    host_key: str = ""
    gpu: bool = False
    gpus: list[int] = field(default_factory=list)  # the indexes of the GPUs it holds
    cpus: float = 0
    memory: int = 0
    state: str = "running"
    direct: bool = False  # its ports are published on the host's addresses, not loopback only

    @property
    def ssh_port(self) -> int:
        return int(self.ports[0]["external"])

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["host_key_fingerprint"] = (host_key_fingerprint(self.host_key) if self.host_key
                                        else None)
        data["pool"] = self.owner == POOL_OWNER
        return data

    def reply(self, host: str, node_id: str) -> ContainerReply:
        """How the host describes it to its owner, who reached the host at ``host``."""
        return ContainerReply(
            id=self.id, image=self.image, ports=[PortMapping(**p) for p in self.ports],
            ssh=SshLogin.of(self.id, host, self.ssh_port, self.host_key, self.direct),
            created=self.created, expires=self.expires, node_id=node_id, gpu=self.gpu,
            gpus=self.gpus, direct=self.direct, owner=self.owner, host_key=self.host_key,
            cpus=self.cpus, memory=self.memory, state=self.state)
