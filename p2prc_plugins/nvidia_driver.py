"""What a container needs from the host to use its NVIDIA GPUs without NVIDIA's container
toolkit (not in Debian's packages): the driver's device nodes, and its user-space files
(the utility and compute sets: nvidia-smi, libnvidia-ml, libcuda and what they load),
bind-mounted read-only at their own paths. That is what the toolkit's hook does.

Those read-only files are the only host paths a GPU container sees, and only a container
that asked for a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Device nodes: one per GPU (nvidia0, nvidia1, ...) and the driver's control nodes.
_GPU_NODE = re.compile(r"nvidia(\d+)")
_CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
# The driver's libraries and programs a CUDA or NVML program needs (utility + compute).
LIBRARIES = ("libnvidia-ml.so", "libcuda.so", "libnvidia-ptxjitcompiler.so",
             "libnvidia-nvvm.so", "libcudadebugger.so", "libnvidia-cfg.so",
             "libnvidia-opencl.so", "libnvidia-gpucomp.so")
PROGRAMS = ("nvidia-smi", "nvidia-debugdump", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
_LDCONFIG_LINE = re.compile(r"^\s*(\S+) \(([^)]*)\) => (/\S+)$")


@dataclass
class Driver:
    """A host's NVIDIA driver, as containers are given it."""

    gpus: list[str] = field(default_factory=list)  # /dev/nvidia0 ...
    controls: list[str] = field(default_factory=list)  # /dev/nvidiactl ...
    files: list[str] = field(default_factory=list)  # read-only, at their own paths

    def devices(self, indexes: list[int] | None = None) -> list[str]:
        """Docker's ``devices`` entries: the chosen GPUs (all when None) and the controls."""
        chosen = [g for g in self.gpus if indexes is None or _index(g) in indexes]
        return [f"{node}:{node}:rwm" for node in chosen + self.controls]

    def volumes(self) -> dict[str, dict[str, str]]:
        return {path: {"bind": path, "mode": "ro"} for path in self.files}


def find_driver(dev: Path = Path("/dev"), ldconfig: str | None = None,
                path: str | None = None) -> tuple[Driver | None, str]:
    """The driver's nodes and files, or None and what is missing (for a 409's message).

    :param ldconfig: ``ldconfig -p``'s output (read from the system when None).
    :param path: where to look for the programs (``$PATH`` and the toolkit's usual places).
    """
    gpus = sorted((str(dev / name) for name in _listing(dev) if _GPU_NODE.fullmatch(name)
                   and _is_char_device(dev / name)), key=_index)
    if not gpus:
        return None, f"no NVIDIA device nodes ({dev}/nvidia0 ...): is the driver loaded?"
    controls = [str(dev / n) for n in _CONTROL_NODES if _is_char_device(dev / n)]
    if str(dev / "nvidiactl") not in controls:
        return None, f"{dev}/nvidiactl is missing: the driver is not fully loaded"
    files = _libraries(ldconfig if ldconfig is not None else _ldconfig())
    if not any(Path(f).name.startswith("libnvidia-ml.so") for f in files):
        return None, "the driver's NVML library (libnvidia-ml.so) is not in ldconfig's cache"
    search = path if path is not None else os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/nvidia/bin", "/usr/bin"])
    for program in PROGRAMS:
        found = shutil.which(program, path=search)
        if found:
            files.append(os.path.realpath(found))
    return Driver(gpus, controls, sorted(set(files))), ""


def _index(node: str) -> int:
    """/dev/nvidia3 -> 3."""
    match = _GPU_NODE.fullmatch(Path(node).name)
    return int(match[1]) if match else -1


def _libraries(listing: str) -> list[str]:
    """The driver's libraries in ``ldconfig -p`` output, 64-bit only, each with the file
    its name points to (both paths are mounted: the name is what programs open)."""
    found: list[str] = []
    for line in listing.splitlines():
        match = _LDCONFIG_LINE.match(line)
        if not match or "x86-64" not in match[2] and "64bit" not in match[2]:
            continue
        name, target = match[1], match[3]
        if any(name.startswith(lib) for lib in LIBRARIES) and os.path.exists(target):
            found.append(target)
            real = os.path.realpath(target)
            if real != target:
                found.append(real)
    return found


def _ldconfig() -> str:
    program = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        return subprocess.run([program, "-p"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _listing(dev: Path) -> list[str]:
    try:
        return os.listdir(dev)
    except OSError:
        return []


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False
