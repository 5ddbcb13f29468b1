"""Jobs a running server does now and then (refresh the table, reap expired containers):
whichever worker's turn it is, at most one runs a job at a time, and not more often than
its interval."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("p2prc.server")


class Periodic:
    def __init__(self, home: Path, name: str, interval: float, job: Callable[[], Any]):
        self.name = name
        self.lock_path = home / f"{name}.lock"
        self.stamp = home / f"{name}.stamp"
        self.interval = interval
        self.job = job
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"p2prc-{self.name}", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        # A little jitter so that workers (and nodes started together) do not all wake at once.
        self._stop.wait(random.uniform(0.2, 1.0))
        while not self._stop.is_set():
            try:
                self.run_if_due()
            except Exception:  # a bad peer or a full disk must not kill the thread
                log.exception("%s failed; trying again later", self.name)
            self._stop.wait(min(self.interval, 30.0) * random.uniform(0.5, 1.0))

    def run_if_due(self) -> Any:
        """Run the job if no other worker is running it and its interval has passed."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            try:
                last = self.stamp.stat().st_mtime
            except FileNotFoundError:
                last = 0.0
            # A stamp over an interval in the future: this clock went back since. The job is
            # due, or it would wait for the clock to catch up (an hour's jump: no reaping for
            # an hour). One a little ahead (a file server's clock) waits as one just made.
            if -self.interval <= time.time() - last < self.interval:
                return None
            result = self.job()
            self.stamp.touch()
            return result
        finally:
            os.close(fd)
