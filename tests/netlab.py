"""Test hosts in network namespaces: a bridge, veth pairs, IPv4 and IPv6 on each.

The root namespace is a host too (the bridge has an address), so tests reach every server
directly. Everything made here is removed again, also when a test fails.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from p2prc_core.tls import client_context

P2PRC = str(Path(sys.executable).with_name("p2prc"))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def available() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"p2prc-probe-{secrets.token_hex(3)}"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot make a network namespace: {result.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str
    namespace: str
    ipv4: str | None
    ipv6: str | None
    home: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "P2PRC_HOME": str(self.home), "P2PRC_REFRESH_SECONDS": "0",
                "P2PRC_WORKERS": "1", "P2PRC_UPNP": "false", **extra}

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def p2prc(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(P2PRC, *args), capture_output=True, text=True,
                              timeout=120, env=self.env(**env))

    def spawn(self, *args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.home / log, "ab") as out:
            proc = subprocess.Popen(self.command(*args), stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(**env))
        self.processes.append(proc)
        return proc

    def serve(self, *args: str, port: int = 8088, **env: str) -> subprocess.Popen[bytes]:
        """Start ``p2prc server`` here and wait until it answers on its address."""
        proc = self.spawn(P2PRC, "server", "--port", str(port), *args, log="server.log", **env)
        return proc

    def wait_ready(self, port: int = 8088, timeout: float = 20, v6: bool = True) -> None:
        host = f"[{self.ipv6}]" if self.ipv6 and v6 else self.ipv4
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"https://{host}:{port}/v1/health", timeout=1,
                          verify=client_context())
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        log = (self.home / "server.log").read_text(errors="replace")
        raise RuntimeError(f"{self.name} did not answer on port {port}:\n{log}")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class NetLab:
    """A bridge with the root namespace on it, and hosts in namespaces of their own."""

    def __init__(self, root: Path):
        self.root = root
        self.tag = secrets.token_hex(3)
        self.bridge = f"p2b{self.tag}"
        net = int(self.tag[:2], 16) % 200 + 20
        self.v4_prefix = f"10.{net}.{int(self.tag[2:4], 16)}"
        self.v6_prefix = f"fd42:{self.tag[:4]}:{self.tag[4:]}::"
        self.hosts: list[Host] = []
        self.rules: list[list[str]] = []
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.v4_prefix}.1/24", "dev", self.bridge)
        run("ip", "-6", "addr", "add", f"{self.v6_prefix}1/64", "dev", self.bridge, "nodad")
        run("ip", "link", "set", self.bridge, "up")
        if shutil.which("iptables"):
            # dockerd drops forwarded traffic by default: let this bridge's through.
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            for tool in ("iptables", "ip6tables"):
                if shutil.which(tool) and run(tool, "-I", *rule, check=False).returncode == 0:
                    self.rules.append([tool, "-D", *rule])

    def add_host(self, name: str, ipv4: bool = True, ipv6: bool = True) -> Host:
        index = len(self.hosts) + 2
        namespace = f"p2prc-{self.tag}-{name}"
        veth, peer = f"p2v{self.tag[:4]}{index}", f"p2p{self.tag[:4]}{index}"
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "master", self.bridge, "up")
        run("ip", "link", "set", veth, "netns", namespace)
        inside = ["ip", "netns", "exec", namespace]
        run(*inside, "ip", "link", "set", "lo", "up")
        v4 = f"{self.v4_prefix}.{index}" if ipv4 else None
        v6 = str(ipaddress.ip_address(f"{self.v6_prefix}{index:x}")) if ipv6 else None
        if v4:
            run(*inside, "ip", "addr", "add", f"{v4}/24", "dev", veth)
        if v6:
            run(*inside, "ip", "-6", "addr", "add", f"{v6}/64", "dev", veth, "nodad")
        else:
            run(*inside, "sysctl", "-qw", f"net.ipv6.conf.{veth}.disable_ipv6=1")
        run(*inside, "ip", "link", "set", veth, "up")
        home = self.root / name
        home.mkdir(parents=True)
        host = Host(name, namespace, v4, v6, home)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.processes:
                host.stop(proc)
            run("ip", "netns", "del", host.namespace, check=False)
        run("ip", "link", "del", self.bridge, check=False)
        for rule in self.rules:
            run(*rule, check=False)
