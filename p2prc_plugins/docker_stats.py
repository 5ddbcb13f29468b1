"""What a container uses now, from the engine's stats of it (``DockerBackend.usage``)."""

from __future__ import annotations

from typing import Any


def usage_of_stats(stats: dict[str, Any]) -> dict[str, float]:
    """``cpu_percent`` (of one CPU: 200 is two busy CPUs) and ``memory`` (bytes, page cache
    left out), as 'docker stats' shows them, from one answer of the engine's stats."""
    cpu, before = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    used = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - \
        (before.get("cpu_usage") or {}).get("total_usage", 0)
    system = cpu.get("system_cpu_usage", 0) - before.get("system_cpu_usage", 0)
    cpus = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get(
        "percpu_usage") or []) or 1
    memory = stats.get("memory_stats") or {}
    details = memory.get("stats") or {}
    cache = details.get("inactive_file", details.get("total_inactive_file", 0))
    return {"cpu_percent": round(used / system * cpus * 100, 1) if system > 0 else 0.0,
            "memory": max(0, memory.get("usage", 0) - cache)}
