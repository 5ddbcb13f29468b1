"""GPUs without NVIDIA's container toolkit: the driver's device nodes and read-only files,
found on a fake driver layout (device nodes made with mknod, fake libraries), and a real
container started with them. (A machine with a real GPU runs the same path for real.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from p2prc_plugins.nvidia_driver import Driver, find_driver


def fake_driver(root: Path) -> tuple[Path, str, Path]:
    """A /dev with nvidia0, nvidiactl, nvidia-uvm (character devices, as /dev/null is) and
    a plain file called nvidia1; libraries and ldconfig's listing of them; nvidia-smi."""
    require(os.geteuid() == 0, "making device nodes needs root")
    dev, lib, bin_ = root / "dev", root / "lib", root / "bin"
    for folder in (dev, lib, bin_):
        folder.mkdir(parents=True)
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (dev / "nvidia1").write_text("not a device")
    (lib / "libnvidia-ml.so.580.1").write_text("fake NVML")
    (lib / "libnvidia-ml.so.1").symlink_to("libnvidia-ml.so.580.1")
    (lib / "libcuda.so.1").write_text("fake CUDA")
    (lib / "libc.so.6").write_text("not the driver's")
    listing = "\n".join([
        "4 libs found in cache `/etc/ld.so.cache'",
        f"\tlibnvidia-ml.so.1 (libc6,x86-64) => {lib}/libnvidia-ml.so.1",
        f"\tlibcuda.so.1 (libc6,x86-64) => {lib}/libcuda.so.1",
        f"\tlibcuda.so.1 (libc6) => {lib}/i386/libcuda.so.1",
        f"\tlibc.so.6 (libc6,x86-64) => {lib}/libc.so.6"])
    smi = bin_ / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake'\n")
    smi.chmod(0o755)
    return dev, listing, bin_


def test_the_driver_is_found_and_nothing_else(tmp_path: Path) -> None:
    dev, listing, bin_ = fake_driver(tmp_path)
    driver, missing = find_driver(dev, listing, str(bin_))
    assert driver is not None and missing == ""
    assert driver.gpus == [str(dev / "nvidia0")]  # nvidia1 is no device node
    assert driver.controls == [str(dev / "nvidiactl"), str(dev / "nvidia-uvm")]
    lib = tmp_path / "lib"
    assert driver.files == sorted([str(lib / "libcuda.so.1"), str(lib / "libnvidia-ml.so.1"),
                                   str(lib / "libnvidia-ml.so.580.1"),
                                   str(bin_ / "nvidia-smi")])
    assert driver.devices() == [f"{dev}/nvidia0:{dev}/nvidia0:rwm",
                                f"{dev}/nvidiactl:{dev}/nvidiactl:rwm",
                                f"{dev}/nvidia-uvm:{dev}/nvidia-uvm:rwm"]
    assert driver.devices([1]) == [f"{dev}/nvidiactl:{dev}/nvidiactl:rwm",
                                   f"{dev}/nvidia-uvm:{dev}/nvidia-uvm:rwm"]
    assert all(v == {"bind": k, "mode": "ro"} for k, v in driver.volumes().items())


@pytest.mark.parametrize("break_it, says", [
    (lambda dev, lib: (dev / "nvidia0").unlink(), "no NVIDIA device nodes"),
    (lambda dev, lib: (dev / "nvidiactl").unlink(), "nvidiactl is missing"),
    (lambda dev, lib: (lib / "libnvidia-ml.so.580.1").unlink(), "libnvidia-ml.so"),
])
def test_what_is_missing_is_named(tmp_path: Path, break_it: Any, says: str) -> None:
    dev, listing, bin_ = fake_driver(tmp_path)
    break_it(dev, tmp_path / "lib")
    driver, missing = find_driver(dev, listing, str(bin_))
    assert driver is None and says in missing


@pytest.mark.docker
@pytest.mark.integration
def test_a_gpu_container_gets_the_nodes_and_the_files_read_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import docker
    from test_containers import key, service

    from p2prc_core.containers import ContainerRequest

    try:
        client = docker.from_env(timeout=60)
        client.ping()
        client.images.get("p2prc/base:latest")
    except docker.errors.DockerException as err:
        require(False, f"no Docker engine or base image ({err})")
    dev, listing, bin_ = fake_driver(tmp_path / "driver")
    driver, _ = find_driver(dev, listing, str(bin_))
    assert isinstance(driver, Driver)
    monkeypatch.setattr("p2prc_plugins.docker.DockerBackend.has_toolkit", lambda self: False)
    monkeypatch.setattr("p2prc_plugins.docker.find_driver", lambda: (driver, ""))
    containers = service(tmp_path / "host")
    containers.gpus = lambda: [{"name": "Fake GPU"}]
    lease = containers.create("me" * 13, ContainerRequest.from_json(
        {"ssh_key": key(tmp_path), "gpu": True}))
    try:
        found = client.containers.get(lease.id)
        devices = {d["PathOnHost"] for d in found.attrs["HostConfig"]["Devices"]}
        assert devices == set(driver.gpus + driver.controls)
        mounts = {m["Source"]: m for m in found.attrs["Mounts"]}
        assert set(mounts) == set(driver.files)  # no other host path
        assert all(m["RW"] is False for m in mounts.values())
        smi = found.exec_run([str(bin_ / "nvidia-smi")])
        assert smi.exit_code == 0 and smi.output.decode().strip() == "GPU 0: Fake"
        assert found.exec_run(["test", "-c", f"{dev}/nvidia0"]).exit_code == 0
        write = found.exec_run(["sh", "-c", f"echo x > {tmp_path}/driver/lib/libcuda.so.1"])
        assert write.exit_code != 0 and b"Read-only" in write.output
    finally:
        containers.remove(lease.id, owner=None)
