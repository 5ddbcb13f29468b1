"""CPU, memory, disk and load of this machine (psutil). Never blocks on sampling."""

from __future__ import annotations

import functools
import os
import platform
import socket
from typing import TYPE_CHECKING, Any

from p2prc_core import hookimpl

if TYPE_CHECKING:
    from types import ModuleType


@functools.cache
def _psutil() -> ModuleType:
    """psutil, imported when specs are first collected (a command that collects none, such
    as ``p2prc peers ls``, loads this plugin all the same)."""
    import psutil

    psutil.cpu_percent(interval=None)  # the first call starts the measurement window
    return psutil


@functools.cache
def _static() -> dict[str, Any]:
    """What does not change while the process runs: read once."""
    uname = platform.uname()
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", uname.system)
    except OSError:
        os_name = uname.system
    return {
        "hostname": socket.gethostname(),
        "os": {"name": os_name, "system": uname.system, "release": uname.release,
               "machine": uname.machine},
        "cpu_model": _cpu_model() or uname.processor or uname.machine,
        "cores": _psutil().cpu_count(logical=False) or _psutil().cpu_count() or 1,
        "threads": _psutil().cpu_count() or 1,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Processor")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@hookimpl(trylast=True)
def p2prc_collect_specs() -> dict[str, Any]:
    static = _static()
    psutil = _psutil()
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(os.path.abspath(os.sep))
    load1, load5, load15 = os.getloadavg()
    return {
        "hostname": static["hostname"],
        "os": static["os"],
        "cpu": {"model": static["cpu_model"], "cores": static["cores"],
                "threads": static["threads"],
                "percent": psutil.cpu_percent(interval=None)},
        "memory": {"total": memory.total, "available": memory.available},
        "disk": {"total": disk.total, "free": disk.free},
        "load": {"1m": load1, "5m": load5, "15m": load15},
    }
