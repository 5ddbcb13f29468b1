"""CPU, memory, disk and load of this machine (psutil). Never blocks on sampling."""

from __future__ import annotations

import functools
import os
import platform
import socket
from typing import Any

import psutil

from p2prc_core import hookimpl


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
        "cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        "threads": psutil.cpu_count() or 1,
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


# The first call of cpu_percent(interval=None) starts the measurement window.
psutil.cpu_percent(interval=None)


@hookimpl(trylast=True)
def p2prc_collect_specs() -> dict[str, Any]:
    static = _static()
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
