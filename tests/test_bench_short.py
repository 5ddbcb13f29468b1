"""Short forms of the scale benchmarks, so that CI runs them: the gossip simulation and a
relay holding many nodes and streams. What is asserted is what the benchmarks exist to
show and that does not depend on the machine's speed (bytes, rounds, every node and stream
served); their times are printed in docs/benchmarks.md, not asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_gossip_simulation_converges_and_a_quiet_round_costs_under_1_kb_an_exchange(
        ) -> None:
    done = subprocess.run([sys.executable, str(BENCH / "bench_gossip.py"), "--inner",
                           "--sizes", "60", "--churn-rounds", "2"],
                          capture_output=True, text=True, timeout=600, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    goal = math.ceil(math.log2(60)) + 2
    assert found["gossip"] and found["join_rounds"] is not None
    assert found["quiet_worst_exchange"] < 1024 and found["quiet_asked"] == 4
    assert found["news_rounds"] is not None and found["news_rounds"] <= goal
    assert found["churn_payload"] > found["quiet_payload"]


@pytest.mark.integration
def test_a_relay_holds_two_hundred_listening_nodes_and_a_hundred_streams() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "bench_relay_load.py"), "--nodes",
                           "200", "--streams", "100", "--pings", "50"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 nodes listening" in done.stderr and "100 streams open" in done.stderr


@pytest.mark.docker
@pytest.mark.ansible
@pytest.mark.integration
def test_a_three_minute_soak_with_faults_leaks_nothing(tmp_path: Path, engine: object) -> None:
    """bench/soak.py for 3 minutes (issue 26's CI form): four clients churning against one
    host, directly and through a relay, with clients' commands, workers, the host and the
    relay killed at random. Nothing may be left held, no 5xx, no traceback, no failure but
    those the faults explain, no container that no client tracks; the figures are printed."""
    figures = tmp_path / "soak.json"
    for attempt in (1, 2):
        done = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--minutes", "3",
                               "--fault-every", "15", "--json", str(figures)],
                              capture_output=True, text=True, timeout=900)
        print(done.stdout)
        print(done.stderr[-5000:])
        # A soak that ended before its first figure did not soak anything (once in CI it
        # printed nothing at all, and its error was not kept): it is said, then run again.
        if figures.exists() or "soak: " in done.stdout:
            break
        print(f"attempt {attempt}: the soak ended before it started (exit {done.returncode})")
    found = json.loads(figures.read_text())
    assert sum(found["faults"].values()) >= 3, found["faults"]  # faults were injected
    assert sum(found["ok"].values()) >= 20, found["ok"]  # and the churn went on
    held = found["end"]["held"]
    assert held["containers"] == 0 and held["places"] == 0, held
    assert held.get("server.db ports", 0) == 0 and held.get("server.db leases", 0) == 0, held
    assert found["five_xx"] == 0 and found["tracebacks"] == 0, found
    assert not found["unexpected"] and not found["untracked"], found
    assert done.returncode == 0, done.stdout + done.stderr
