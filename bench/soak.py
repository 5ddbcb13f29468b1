"""Soak: churn against one host from four clients for a while, with faults injected at random,
and what the host holds at the start and at the end.

Real parts on this machine: a relay and a host (``p2prc server``, 2 workers each; the host
trusts the clients, waits at the relay, and advertises a port where nothing listens, so that a
client that knows it only from the table goes through the relay) and the Docker engine. Each
client is a thread that runs the ``p2prc`` command, as a user would, over and over:

- ``touch`` (direct: by the host's address; relayed: by its node id), ``rm``;
- ``exec`` of a short command (direct or relayed), ``run`` of a playbook on a container;
- ``peers update``, ``containers ls``.

Faults, one every ``--fault-every`` seconds on average (``--no-faults``: none): a client's
command killed (SIGKILL) mid-way; one of the host's workers killed; the whole host killed and
started again; the relay killed and started again. A command that fails while a fault is
under way (or within a few seconds after) is counted as hit by it; any other failure is
unexpected.

Printed at the start (after a warm-up) and at the end (after the clients removed what they
hold, and the reaper's pass): each server process's open descriptors, threads and resident
memory; containers, ports, GPUs and places the host holds; rows in server.db; and, over the
whole run, 5xx answers and tracebacks in every log and command output. Goal (issue 26): all
flat (within 5%), nothing leaked, no 5xx, no traceback. A 502, 503 or 504 logged while a
fault was under way (a relay whose node was killed before it came to accept, say) is that
fault's answer, counted apart; a 500 never is.

Run: .venv/bin/python bench/soak.py [--minutes 30] [--clients 4] [--seed 1] [--faults KINDS]
     [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import P2PRC, free_port, wait_http  # noqa: E402

from p2prc_core.identity import NodeIdentity  # noqa: E402
from p2prc_core.trust import TrustStore  # noqa: E402

PLAYBOOK = "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: echo soaked\n"
GRACE = 10.0  # seconds after a fault in which a failed command counts as hit by it (a
# restarted host or relay is waited at again, and found, within this)
FIVE_XX = re.compile(rb'" 5\d\d ')
ACCESS = re.compile(r'^\[([^\]]+)\] .*" (5\d\d) \d+ bytes (\d+)ms$')  # a 5xx line's when
FAULTS = ["client command", "host worker", "host", "relay"]
GATEWAY = {"502", "503", "504"}  # answers about another node or a limit, never our own bug


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            pass
    return found


def process_figures(pid: int) -> dict[str, int]:
    """Open descriptors, threads and resident memory (KiB) of one process."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads, "rss_kib": rss}


def explained_5xx(line: str, tally: Tally) -> bool:
    """Whether a 5xx access-log line is a gateway's answer (502, 503, 504: the node it
    relays to, or a limit) given while a fault was under way; a 500 never is."""
    found = ACCESS.search(line.strip())
    if found is None or found.group(2) not in GATEWAY:
        return False
    try:
        ended = datetime.datetime.strptime(found.group(1), "%d/%b/%Y:%H:%M:%S %z").timestamp()
    except ValueError:
        return False
    ended -= time.time() - time.monotonic()  # the fault windows are on the monotonic clock
    return tally.in_fault(ended - int(found.group(3)) / 1000 - 1, ended + 1)  # (1 s: the
    # log's times are whole seconds)


@dataclass
class Server:
    """One ``p2prc server`` of the soak: started, killed and started again on its port."""

    name: str
    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.home / f"server.{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [P2PRC, "server"], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "P2PRC_HOME": str(self.home), "P2PRC_PORT": str(self.port),
                     "P2PRC_UPNP": "false", "P2PRC_ALLOW_LOOPBACK": "true",
                     "P2PRC_REFRESH_SECONDS": "0", **self.env})
        wait_http(f"https://127.0.0.1:{self.port}/v1/health", self.proc, 60)

    def workers(self) -> list[int]:
        return [] if self.proc is None else children(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the master and its workers at once (a power cut), then wait for them."""
        assert self.proc is not None
        pids = [self.proc.pid, *self.workers()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def figures(self) -> dict[str, dict[str, int]]:
        """Each process's figures, by role (master, worker 1, ...)."""
        assert self.proc is not None
        found = {f"{self.name} master": {**process_figures(self.proc.pid),
                                          "pid": self.proc.pid}}
        for i, pid in enumerate(sorted(self.workers()), 1):
            try:
                found[f"{self.name} worker {i}"] = {**process_figures(pid), "pid": pid}
            except OSError:
                pass
        return found

    def log_counts(self, tally: Tally) -> tuple[int, int, int]:
        """5xx answers that no fault explains, those a fault does, and tracebacks, in every
        log this server wrote."""
        text = self.log_text()
        lines = [line for line in text.decode(errors="replace").splitlines()
                 if FIVE_XX.search(line.encode())]
        explained = sum(explained_5xx(line, tally) for line in lines)
        return len(lines) - explained, explained, text.count(b"Traceback")

    def log_text(self) -> bytes:
        return b"".join(log.read_bytes() for log in self.logs if log.exists())

    def first_problems(self, tally: Tally) -> list[str]:
        """The lines around each unexplained 5xx answer and traceback (the first five of
        each)."""
        lines = self.log_text().decode(errors="replace").splitlines()
        marks = [i for i, line in enumerate(lines) if FIVE_XX.search(line.encode())
                 and not explained_5xx(line, tally)][:5]
        marks += [i for i, line in enumerate(lines) if "Traceback" in line][:5]
        return [f"{self.name}: " + "\n    ".join(lines[max(0, i - 3):i + 25]) for i in marks]


@dataclass
class Tally:
    """What the commands did, counted across clients (under a lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: dict[str, int] = field(default_factory=dict)
    hit: dict[str, int] = field(default_factory=dict)  # failed while a fault was under way
    unexpected: list[str] = field(default_factory=list)
    tracebacks: int = 0
    traceback_samples: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    fault_windows: list[tuple[float, float]] = field(default_factory=list)

    def in_fault(self, started: float, ended: float) -> bool:
        with self.lock:
            return any(s - GRACE <= ended and started <= e + GRACE
                       for s, e in self.fault_windows)

    def count(self, op: str, ok: bool, started: float, ended: float, output: str,
              killed: bool) -> None:
        traceback = "Traceback" in output
        hit = not ok and (killed or self.in_fault(started, ended))
        with self.lock:
            self.tracebacks += traceback
            if traceback and len(self.traceback_samples) < 3:
                self.traceback_samples.append(f"{op}: {output[-2500:]}")
            if ok:
                self.ok[op] = self.ok.get(op, 0) + 1
            elif hit:
                self.hit[op] = self.hit.get(op, 0) + 1
            else:
                self.unexpected.append(f"{op}: {output.strip()[-300:]}")


class Client(threading.Thread):
    """One user of the host, running commands until ``stop`` is set."""

    def __init__(self, index: int, home: Path, soak: Soak):
        super().__init__(name=f"client {index}", daemon=True)
        self.index, self.home, self.soak = index, home, soak
        self.rng = random.Random(soak.seed * 100 + index)
        self.current: subprocess.Popen[str] | None = None
        self.killed = False
        self.lock = threading.Lock()
        self.idle = threading.Event()  # set between commands
        self.unsure: set[str] = set()  # containers whose rm was killed, or whose exec failed: the
        # host may have removed them before the client could forget them; removed again (as
        # a user would), never run on

    def p2prc(self, *args: str, timeout: float = 180) -> tuple[int, str, str]:
        with self.lock:
            self.killed = False
            self.current = subprocess.Popen(
                [P2PRC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "P2PRC_HOME": str(self.home), "P2PRC_ALLOW_LOOPBACK": "true",
                     "P2PRC_PUNCH": "false", "P2PRC_REQUEST_TIMEOUT": "20"})
        proc = self.current
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n(no end within {timeout} s: killed)"
        with self.lock:
            self.current = None
        return proc.returncode, out, err

    def kill_current(self) -> bool:
        """SIGKILL the command running now, if one is; whether one was."""
        with self.lock:
            if self.current is None or self.current.poll() is not None:
                return False
            self.killed = True
            self.current.kill()
            return True

    def tracked(self, lasting: float = 0) -> list[str]:
        """The containers this client tracks (``lasting``: those whose lease has at least
        that many seconds left: a killed exec's container ends with its short lease)."""
        path = self.home / "containers.json"
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        return [i for i, c in found.items()
                if not lasting or c.get("expires", 0) > time.time() + lasting]

    def run(self) -> None:
        while not self.soak.stop.is_set():
            self.idle.set()
            self.soak.running.wait()
            self.idle.clear()
            if self.soak.stop.is_set():
                break
            op, args = self.choose()
            before = set(self.tracked())
            started = time.monotonic()
            code, out, err = self.p2prc(*args)
            self.soak.tally.count(op, code == 0, started, time.monotonic(), out + err,
                                  self.killed)
            if op == "rm":
                (self.unsure.add if self.killed else self.unsure.discard)(args[1])
            elif op.startswith("exec") and code != 0:  # killed, or cut off by a fault: its
                # host may remove what it made (a command with no outputs is removed once it
                # ends, whether or not its caller still listens)
                self.unsure.update(i[:12] for i in set(self.tracked()) - before)

    def choose(self) -> tuple[str, list[str]]:
        host = self.soak.host
        relayed = self.rng.random() < 0.5
        where = host_id(host) if relayed else f"127.0.0.1:{host.port}"
        mine = [i for i in self.tracked(lasting=300) if i[:12] not in self.unsure]
        unsure = [i for i in self.tracked() if i[:12] in self.unsure]
        kind = "rm" if unsure else self.rng.choices(
            ["touch", "rm", "exec", "run", "update", "ls"],
            [3 if len(mine) < 2 else 0, 2 if mine else 0, 3, 2 if mine else 0, 1, 1])[0]
        name = f"{kind} {'relayed' if relayed else 'direct'}" \
            if kind in ("touch", "exec") else kind
        if kind == "touch":
            return name, ["touch", where, "--ttl", "2h"]
        if kind == "rm":
            return name, ["rm", self.rng.choice(unsure or mine)[:12]]
        if kind == "exec":
            return name, ["exec", "--on", where, "--timeout", "2m", "--", "sh", "-c",
                          "head -c 100000 /dev/urandom | wc -c"]
        if kind == "run":
            return name, ["run", str(self.soak.playbook), "--on", self.rng.choice(mine)[:12]]
        if kind == "update":
            return name, ["peers", "update", "--all"]
        return name, ["containers", "ls", "--json"]


def host_id(server: Server) -> str:
    return NodeIdentity.load_or_create(server.home).node_id


class Soak:
    """The servers, the clients, the faults, and the figures."""

    def __init__(self, root: Path, clients: int, seed: int):
        self.root, self.seed = root, seed
        self.stop = threading.Event()
        self.running = threading.Event()  # cleared: clients wait before their next command
        self.running.set()
        self.tally = Tally()
        # Every client here comes from loopback, one network to the relay: its limit per
        # network is raised to what four users on four networks would get.
        self.relay = Server("relay", root / "relay", {"P2PRC_RELAY": "true",
                                                      "P2PRC_RELAY_OPEN": "true",
                                                      "P2PRC_RELAY_STREAMS_PER_NETWORK": "16",
                                                      "P2PRC_RELAY_POLLS_PER_NETWORK": "16",
                                                      "P2PRC_WORKERS": "2"})
        self.relay.start()
        homes = [root / f"client{i}" for i in range(clients)]
        host_home = root / "host"
        for home in homes:
            TrustStore(host_home).add(NodeIdentity.load_or_create(home).node_id, home.name)
        self.host = Server("host", host_home, {
            "P2PRC_WORKERS": "2", "P2PRC_DISABLE_PLUGINS": "nvidia",
            "P2PRC_USE_RELAY": "always", "P2PRC_ADVERTISE_ADDRESSES": "127.0.0.1",
            "P2PRC_ADVERTISE_PORT": str(free_port()), "P2PRC_CONTAINERS_PER_CALLER": "8",
            "P2PRC_REAP_SECONDS": "2", "P2PRC_CONTAINER_EXITED_GRACE": "5",
            "P2PRC_RELAYS": f"{host_id(self.relay)}@127.0.0.1:{self.relay.port}"})
        self.host.start()
        self.playbook = root / "work" / "site.yml"
        self.playbook.parent.mkdir()
        self.playbook.write_text(PLAYBOOK)
        self.clients = [Client(i, home, self) for i, home in enumerate(homes)]

    def learn_the_host(self) -> None:
        """Each client adds the relay and learns the host's record (naming its relay)."""
        for client in self.clients:
            code, _, err = client.p2prc("peers", "add", f"127.0.0.1:{self.relay.port}")
            if code:
                raise SystemExit(f"{client.name} cannot add the relay: {err}")
            deadline = time.monotonic() + 60
            while True:
                client.p2prc("peers", "update", "--hops", "2")
                _, out, _ = client.p2prc("peers", "ls", "--json")
                rows = {r["node_id"]: r for r in json.loads(out or "[]")}
                if rows.get(host_id(self.host), {}).get("relays"):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{client.name} never learnt the host's relay")
                time.sleep(0.5)

    def inject(self, every: float, kinds: list[str]) -> None:
        """One fault of ``kinds`` every ``every`` seconds on average, until ``stop``."""
        rng = random.Random(self.seed)
        while not self.stop.wait(rng.expovariate(1 / every)):
            kind = rng.choice(kinds)
            with self.tally.lock:  # under way from now: commands that fail meanwhile are its
                window = len(self.tally.fault_windows)
                self.tally.fault_windows.append((time.monotonic(), float("inf")))
            if kind == "client command":
                hit = rng.choice(self.clients).kill_current()
            elif kind == "host worker":
                workers = self.host.workers()
                hit = bool(workers)
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
            else:
                hit = True
                server = self.host if kind == "host" else self.relay
                server.kill()
                server.start()
            with self.tally.lock:
                began = self.tally.fault_windows[window][0]
                self.tally.fault_windows[window] = (began, time.monotonic() if hit else began)
                if hit:
                    self.tally.faults[kind] = self.tally.faults.get(kind, 0) + 1

    def held(self) -> dict[str, int]:
        """What the host holds: containers (the engine's, by its label), and rows of
        server.db by table (leases include places; ports and GPUs held)."""
        import docker

        engine = docker.from_env(timeout=60)
        node = host_id(self.host)
        found = {"containers": len(engine.api.containers(
            all=True, filters={"label": f"org.p2prc.node={node}"}))}
        db = sqlite3.connect(self.host.home / "server.db", timeout=30)
        try:
            tables = [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            for table in tables:
                found[f"server.db {table}"] = db.execute(
                    f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
            found["places"] = db.execute(
                "SELECT COUNT(*) FROM leases WHERE id LIKE 'pending-%'").fetchone()[0]
        finally:
            db.close()
        return found

    def snapshot(self) -> dict[str, Any]:
        return {"processes": {**self.relay.figures(), **self.host.figures()},
                "held": self.held()}

    def quiet_snapshot(self) -> dict[str, Any]:
        """The figures with no command running (each client between two), a few seconds
        after the last one ended: what the servers hold at rest."""
        self.running.clear()
        for client in self.clients:
            client.idle.wait(240)
        time.sleep(3)  # connections the last commands left are closed by now
        try:
            return self.snapshot()
        finally:
            self.running.set()

    def wind_down(self) -> dict[str, Any]:
        """Stop the clients; each lists (finding what lost answers started) and removes
        what it holds; then what nobody tracked, and the reaper's pass."""
        self.stop.set()
        self.running.set()
        for client in self.clients:
            client.join(240)
        tracked: set[str] = set()
        for client in self.clients:
            client.p2prc("containers", "ls", "--json")
            tracked |= set(client.tracked())
        import docker

        engine = docker.from_env(timeout=60)
        node = host_id(self.host)
        running = {c["Id"] for c in engine.api.containers(
            all=True, filters={"label": f"org.p2prc.node={node}"})}
        untracked = running - tracked
        for client in self.clients:
            for container_id in client.tracked():
                client.p2prc("rm", container_id[:12])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                v for k, v in self.held().items() if k in ("containers", "places")):
            time.sleep(1)
        return {"untracked": sorted(untracked)}


def processes_now(soak: Soak) -> dict[str, dict[str, int]]:
    """Each server process's figures now (one that is being restarted is left out)."""
    found: dict[str, dict[str, int]] = {}
    for server in (soak.relay, soak.host):
        try:
            found.update(server.figures())
        except (OSError, AttributeError):
            pass
    return found


def trends(samples: list[dict[str, dict[str, int]]]) -> list[str]:
    """For each process that lived through every sample: its resident memory (MB) and
    descriptors at each, so a plateau can be told from a climb."""
    lines = []
    for name in sorted(samples[0]):
        pids = {s.get(name, {}).get("pid") for s in samples}
        if len(pids) != 1 or None in pids:
            continue
        rss = " ".join(f"{s[name]['rss_kib'] / 1024:.1f}" for s in samples)
        fds = " ".join(str(s[name]["fds"]) for s in samples)
        lines.append(f"{name}, each minute: memory (MB) {rss}; descriptors {fds}")
    return lines


def table(start: dict[str, Any], end: dict[str, Any]) -> list[str]:
    lines = [f"{'what':<34} {'start':>10} {'end':>10}  change"]
    for name in sorted(set(start["processes"]) | set(end["processes"])):
        same = start["processes"].get(name, {}).get("pid") == \
            end["processes"].get(name, {}).get("pid")
        for key in ("fds", "threads", "rss_kib"):
            a = start["processes"].get(name, {}).get(key)
            b = end["processes"].get(name, {}).get(key)
            change = "" if not a or b is None else f"{(b - a) / a:+.1%}"
            change += "" if same else " (a new process: the old one was killed)"
            lines.append(f"{name + ' ' + key:<34} {a if a is not None else '-':>10} "
                         f"{b if b is not None else '-':>10}  {change}")
    for key in sorted(set(start["held"]) | set(end["held"])):
        lines.append(f"{key:<34} {start['held'].get(key, '-'):>10} "
                     f"{end['held'].get(key, '-'):>10}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-every", type=float, default=20, help="seconds, on average")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"the kinds to inject, comma-separated (default: all: "
                             f"{', '.join(FAULTS)}); leave 'host' and 'host worker' out to "
                             f"see whether the host's processes stay flat over the run")
    parser.add_argument("--warm-up", type=float, default=None,
                        help="seconds of churn before the start figures (default: a tenth)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    if not kinds or set(kinds) - set(FAULTS):
        parser.error(f"--faults: kinds among {', '.join(FAULTS)}")
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="p2prc-soak-") as tmp:
        soak = Soak(Path(tmp), args.clients, args.seed)
        try:
            soak.learn_the_host()
            for client in soak.clients:
                client.start()
            warm = args.warm_up if args.warm_up is not None else seconds / 10
            print(f"soak: {args.clients} clients, {args.minutes:g} min, warm-up {warm:.0f} s, "
                  f"faults: {'none' if args.no_faults else ', '.join(kinds)}", flush=True)
            time.sleep(warm)
            start = soak.quiet_snapshot()
            if not args.no_faults:
                threading.Thread(target=soak.inject, args=(args.fault_every, kinds),
                                 daemon=True).start()
            deadline = time.monotonic() + seconds - warm
            samples = [start["processes"]]  # each minute, under load: the trend of each
            while time.monotonic() < deadline:
                time.sleep(min(60.0, max(0.0, deadline - time.monotonic())))
                samples.append(processes_now(soak))
                print(f"  {sum(soak.tally.ok.values())} commands ok, "
                      f"{len(soak.tally.unexpected)} unexpected failures, faults "
                      f"{soak.tally.faults}", flush=True)
            left = soak.wind_down()
            time.sleep(3)
            end = soak.snapshot()
        finally:
            soak.stop.set()
            soak.host.stop()
            soak.relay.stop()
        t = soak.tally
        counts = [s.log_counts(t) for s in (soak.host, soak.relay)]
        five_xx, five_xx_hit, logged = (sum(c[i] for c in counts) for i in range(3))
        problems = [p for s in (soak.host, soak.relay) for p in s.first_problems(t)]
        figures = {"minutes": args.minutes, "start": start, "end": end, "samples": samples,
                   "ok": t.ok,
                   "hit_by_faults": t.hit, "unexpected": t.unexpected, "faults": t.faults,
                   "five_xx": five_xx, "five_xx_in_faults": five_xx_hit,
                   "tracebacks": t.tracebacks + logged,
                   "untracked": left["untracked"], "problems": problems}
    print("\n".join(table(start, end)))
    print("\n".join(trends(samples)))
    print(f"commands ok: {t.ok}")
    print(f"failed while a fault was under way: {t.hit}")
    print(f"faults injected: {t.faults}")
    print(f"unexpected failures: {len(t.unexpected)}")
    for line in t.unexpected[:20]:
        print(f"  {line}")
    print(f"5xx answers no fault explains: {five_xx} (502-504 while a fault was under way: "
          f"{five_xx_hit}); tracebacks: {t.tracebacks} in commands, {logged} in logs; "
          f"containers no client tracked: {len(left['untracked'])}")
    for sample in t.traceback_samples:
        print(f"a traceback in a command's output: {sample}")
    for problem in problems:
        print(problem)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    leaked = end["held"]["containers"] + end["held"].get("server.db ports", 0) + \
        end["held"]["places"] + end["held"].get("server.db gpus", 0)
    return 0 if not (leaked or five_xx or t.tracebacks or logged or t.unexpected
                     or left["untracked"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
