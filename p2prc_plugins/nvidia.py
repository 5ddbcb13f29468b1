"""NVIDIA GPUs through NVML (pynvml). No GPU or no driver gives an empty list, never an error."""

from __future__ import annotations

import threading
from typing import Any

from p2prc_core import hookimpl

_lock = threading.Lock()
_state: dict[str, Any] = {"ready": None}


def _init() -> Any:
    """Initialise NVML once; returns the module, or None where there is no driver."""
    with _lock:
        if _state["ready"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _state["ready"] = pynvml
            except Exception:  # no library, no driver, no device: all mean "no GPU"
                _state["ready"] = False
        return _state["ready"] or None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus() -> list[dict[str, Any]]:
    nvml = _init()
    if nvml is None:
        return []
    found = []
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except nvml.NVMLError:
                utilization = None
            try:
                minor = int(nvml.nvmlDeviceGetMinorNumber(handle))  # /dev/nvidia<minor>
            except nvml.NVMLError:
                minor = index
            found.append({"index": index, "minor": minor,
                          "name": _text(nvml.nvmlDeviceGetName(handle)),
                          "memory_total": memory.total, "memory_used": memory.used,
                          "driver": driver, "utilization_percent": utilization})
    except nvml.NVMLError:
        return found
    return found


@hookimpl(trylast=True)
def p2prc_collect_specs() -> dict[str, Any]:
    return {"gpus": gpus()}
