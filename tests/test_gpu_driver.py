"""GPUs without NVIDIA's container toolkit: the driver's device nodes and read-only files,
found on a fake driver layout (device nodes made with mknod, fake libraries), and a real
container started with them. (A machine with a real GPU runs the same path for real.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import P2PRC, require
from p2prc_plugins.nvidia_driver import Driver, find_driver


def fake_driver(root: Path, gpus: int = 1) -> tuple[Path, str, Path]:
    """A /dev with nvidia0 ... (``gpus`` of them), nvidiactl, nvidia-uvm (character devices,
    as /dev/null is) and a plain file called nvidia<gpus>; libraries and ldconfig's listing
    of them; nvidia-smi."""
    require(os.geteuid() == 0, "making device nodes needs root")
    dev, lib, bin_ = root / "dev", root / "lib", root / "bin"
    for folder in (dev, lib, bin_):
        folder.mkdir(parents=True)
    for name in (*(f"nvidia{i}" for i in range(gpus)), "nvidiactl", "nvidia-uvm"):
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (dev / f"nvidia{gpus}").write_text("not a device")
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


def gpu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             gpus: int) -> tuple[Path, Path, Driver, Any]:
    """The container service over the real engine on a host whose driver is a fake layout
    with ``gpus`` GPUs (and no NVIDIA toolkit): its /dev, its programs, the driver, and the
    service."""
    from test_containers import service

    dev, listing, bin_ = fake_driver(tmp_path / "driver", gpus=gpus)
    driver, _ = find_driver(dev, listing, str(bin_))
    assert isinstance(driver, Driver)
    monkeypatch.setattr("p2prc_plugins.docker.DockerBackend.has_toolkit", lambda self: False)
    monkeypatch.setattr("p2prc_plugins.docker.find_driver", lambda: (driver, ""))
    return dev, bin_, driver, service(tmp_path / "host", gpus_per_caller=0)  # one caller


@pytest.mark.docker
@pytest.mark.integration
def test_a_gpu_container_gets_the_nodes_and_the_files_read_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    from test_containers import key

    from p2prc_core.containers import ContainerRequest

    dev, bin_, driver, containers = gpu_host(tmp_path, monkeypatch, gpus=1)
    containers.gpus = lambda: [{"name": "Fake GPU"}]
    lease = containers.create("me" * 13, ContainerRequest.from_json(
        {"ssh_key": key(tmp_path), "gpu": True}))
    try:
        found = engine.containers.get(lease.id)
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


@pytest.mark.docker
@pytest.mark.integration
def test_each_container_gets_only_the_gpus_it_holds_and_its_login_can_use_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    import subprocess

    from p2prc_core.containers import ContainerError, ContainerRequest
    from p2prc_core.sshkeys import ensure_key, known_hosts_line

    dev, bin_, driver, containers = gpu_host(tmp_path, monkeypatch, gpus=2)
    # NVML's GPU 0 is /dev/nvidia1 here: its order need not be the device nodes'.
    containers.gpus = lambda: [{"index": 0, "minor": 1, "name": "Fake"},
                               {"index": 1, "minor": 0, "name": "Fake"}]
    private, public = ensure_key(tmp_path / "me")
    owner = "me" * 13
    first = containers.create(owner, ContainerRequest.from_json(
        {"ssh_key": public, "gpu": [0]}))
    try:
        second = containers.create(owner, ContainerRequest.from_json(
            {"ssh_key": public, "gpu": True}))  # every free one: GPU 1
        try:
            assert (first.gpus, second.gpus) == ([0], [1])
            for lease, node in ((first, "nvidia1"), (second, "nvidia0")):
                found = engine.containers.get(lease.id)
                devices = {d["PathOnHost"] for d in found.attrs["HostConfig"]["Devices"]}
                assert devices == {str(dev / node), *driver.controls}
            with pytest.raises(ContainerError) as refused:
                containers.create(owner, ContainerRequest.from_json(
                    {"ssh_key": public, "gpu": 1}))
            assert refused.value.status == 409 and "0 free now" in str(refused.value)
            # The user who logs in (root, every capability dropped) can open its GPU's node
            # and run the driver's program; the other GPU's node is not there.
            known = tmp_path / "known_hosts"
            known.write_text(known_hosts_line("127.0.0.1", first.ssh_port, first.host_key))
            login = subprocess.run(
                ["ssh", "-i", str(private), "-p", str(first.ssh_port), "-o", "BatchMode=yes",
                 "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                 "-o", "ConnectTimeout=20", "root@127.0.0.1",
                 f"test -r {dev}/nvidia1 && test -w {dev}/nvidia1 && "
                 f"! test -e {dev}/nvidia0 && {bin_}/nvidia-smi"],
                capture_output=True, text=True, timeout=60)
            assert login.returncode == 0, login.stderr
            assert login.stdout.strip() == "GPU 0: Fake"
            # The host sees which container holds which GPU.
            shown = subprocess.run([P2PRC, "server", "containers", "ls"], capture_output=True,
                                   text=True, timeout=60,
                                   env={**os.environ, "P2PRC_HOME": str(tmp_path / "host")})
            rows = {line.split()[0]: line for line in shown.stdout.splitlines()[1:]}
            assert rows[first.id[:12]].split()[-4] == "0", shown.stdout  # gpus, then expires
            assert rows[second.id[:12]].split()[-4] == "1", shown.stdout
        finally:
            containers.remove(second.id, owner=None)
        assert containers.store.gpu_holders() == {0: [first.id]}  # a removal frees its GPU
    finally:
        containers.remove(first.id, owner=None)
    assert containers.store.gpu_holders() == {}
