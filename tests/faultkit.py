"""What the fault suite's tests share (tests/test_faults_*.py, and the warm pool's): waiting
for a condition, and the p2prc command as a user runs it in a home."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import P2PRC


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    """``condition()``'s first true value, asked again until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def p2prc(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``p2prc ARGS`` with ``home`` as its P2PRC_HOME, its output captured."""
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "P2PRC_HOME": str(home)})
