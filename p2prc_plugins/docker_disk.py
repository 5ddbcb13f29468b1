"""How much of the host's disk one container may fill.

Where the engine's storage can limit a container's writable layer (overlay2 on XFS with
project quotas, btrfs, zfs, devicemapper), ``storage_opt size`` does it, and the container is
otherwise as usual. Elsewhere (overlay2 on ext4, the common case) nothing in the engine can:
the container's root is then read-only and the places programs write to are tmpfs of at most
the limit each. tmpfs lives in memory and is charged to the container's memory limit, so
what a container can write is bounded by that limit too, and nothing reaches the host's disk.
Only images that say they run with a read-only root (label ``org.p2prc.readonly=1``, which
p2prc's base image carries) get one; another image runs with no disk limit, and the host's
log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("p2prc.docker")

READONLY_LABEL = "org.p2prc.readonly"
# Where programs, sshd, Ansible and the package caches write; /usr and /etc stay the image's.
WRITABLE = {"/tmp": "1777", "/var/tmp": "1777", "/run": "755", "/root": "700", "/home": "755",
            "/srv": "755", "/opt": "755", "/mnt": "755", "/var/log": "755",
            "/var/cache": "755", "/job": "755"}  # /job: p2prc exec's working folder
# Storage drivers whose size option limits a container's writable layer.
QUOTA_DRIVERS = {"btrfs", "zfs", "devicemapper", "windowsfilter"}


class DiskLimit:
    """Chooses, once per engine, how a container's disk use is limited."""

    def __init__(self, client: Callable[[], Any]):
        self._client = client
        self._quota: bool | None = None
        self._warned: set[str] = set()

    def quota(self) -> bool:
        """Whether the engine's storage can limit a writable layer (``storage_opt``)."""
        if self._quota is None:
            info = self._client().info()
            driver = info.get("Driver", "")
            status = dict(info.get("DriverStatus") or [])
            self._quota = driver in QUOTA_DRIVERS or (
                driver == "overlay2" and status.get("Backing Filesystem") == "xfs")
        return self._quota

    def refused(self, err: Any) -> bool:
        """Whether the engine refused the size option (overlay2 on XFS without pquota);
        then it is not asked again."""
        text = str(getattr(err, "explanation", "") or err).lower()
        if "storage-opt" in text or "storage opt" in text or "storageopt" in text:
            self._quota = False
            return True
        return False

    def options(self, image: str, disk: int) -> dict[str, Any]:
        """The create options that limit a container of ``image`` to ``disk`` bytes."""
        if disk <= 0:
            return {}
        if self.quota():
            return {"storage_opt": {"size": str(disk)}}
        labels = self._client().images.get(image).labels or {}
        if labels.get(READONLY_LABEL) != "1":
            if image not in self._warned:
                self._warned.add(image)
                log.warning("image %s does not run with a read-only root and this engine "
                            "cannot limit a container's disk: its containers may fill this "
                            "host's disk (p2prc's base image can: 'p2prc image build')", image)
            return {}
        return {"read_only": True,
                "tmpfs": {path: f"size={disk},mode={mode},exec,nosuid,nodev"
                          for path, mode in WRITABLE.items()}}
