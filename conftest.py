"""Shared fixtures: plugin managers without entry points, test apps, and real servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

import p2prc_plugins.address
import p2prc_plugins.nvidia
import p2prc_plugins.scoring
import p2prc_plugins.specs
from p2prc_core.config import Settings
from p2prc_core.identity import NodeIdentity
from p2prc_core.plugins import PluginHooks, make_plugin_manager
from p2prc_core.tls import client_context

BUILTINS = [("address", p2prc_plugins.address), ("scoring", p2prc_plugins.scoring),
            ("specs", p2prc_plugins.specs), ("nvidia", p2prc_plugins.nvidia)]

P2PRC = str(Path(sys.executable).with_name("p2prc"))


def require(condition: bool, reason: str) -> None:
    """Skip when a tool an integration test needs is missing, but fail in CI."""
    if condition:
        return
    if os.environ.get("P2PRC_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"integration prerequisite missing (P2PRC_REQUIRE_INTEGRATION=1): {reason}")
    pytest.skip(reason)


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET6 if ipv6_loopback_works() else socket.AF_INET) as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def hooks() -> PluginHooks:
    """The built-in plugins, registered directly (no entry points), as devpi's tests do."""
    return make_plugin_manager(load_entrypoints=False, plugins=BUILTINS)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh node home; P2PRC_* variables from the caller's shell are cleared."""
    for var in list(os.environ):
        if var.startswith("P2PRC_") and var != "P2PRC_REQUIRE_INTEGRATION":
            monkeypatch.delenv(var)
    path = tmp_path / "home"
    monkeypatch.setenv("P2PRC_HOME", str(path))
    return path


# For tests that speak to a server's API directly, as any HTTP client could: TLS 1.3 without
# checking the node key (the p2prc client checks it; tests of that use the client).
web = httpx.Client(verify=client_context(), trust_env=False,
                   limits=httpx.Limits(max_keepalive_connections=0))


class LiveServer:
    """A real ``p2prc server`` process on a free port."""

    def __init__(self, home: Path, port: int, proc: subprocess.Popen[bytes], log: Path,
                 scheme: str = "https"):
        self.home, self.port, self.proc, self.log = home, port, proc, log
        self.scheme = scheme

    @property
    def node_id(self) -> str:
        return NodeIdentity.load_or_create(self.home).node_id

    def url(self, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{self.peer(host)}"

    def peer(self, host: str = "127.0.0.1") -> str:
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(home: Path, *args: str, env: dict[str, str] | None = None,
                 command: tuple[str, ...] = ("server",), wait: float = 20,
                 port: int | None = None) -> LiveServer:
    """Start ``p2prc server`` (or ``command``) with its port set through P2PRC_PORT."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    # Servers started by tests advertise loopback only, so that nothing a test does dials
    # this machine's real interfaces (nor asks its router for a port: no UPnP); and they
    # refresh their tables only when told to.
    full_env = {**os.environ, "P2PRC_HOME": str(home), "P2PRC_WORKERS": "1",
                "P2PRC_UPNP": "false",
                "P2PRC_PORT": str(port), "P2PRC_ALLOW_LOOPBACK": "true",
                "P2PRC_ADVERTISE_ADDRESSES": "::1,127.0.0.1" if ipv6_loopback_works()
                else "127.0.0.1", "P2PRC_REFRESH_SECONDS": "0", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([P2PRC, *command, *args],
                                stdout=out, stderr=subprocess.STDOUT, env=full_env)
    scheme = "http" if full_env.get("P2PRC_TRANSPORT") == "http" else "https"
    server = LiveServer(home, port, proc, log, scheme)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            if web.get(server.url() + "/v1/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not answer within {wait} s:\n{server.output()}")


def serve_tls(server: socketserver.BaseServer, identity: NodeIdentity, home: Path) -> None:
    """Make a test's own HTTP server speak TLS as node ``identity`` would."""
    from p2prc_core.identity import KEY_FILE
    from p2prc_core.tls import server_context, server_files

    home.mkdir(parents=True, exist_ok=True)
    (home / KEY_FILE).write_bytes(identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = server_context(*server_files(home, identity))
    server.socket = context.wrap_socket(server.socket, server_side=True)  # type: ignore[attr-defined]


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(tmp_path / "server-home")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def servers() -> Iterator[list[LiveServer]]:
    """Servers a test starts (it appends them): stopped after, also when it fails."""
    started: list[LiveServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def engine() -> object:
    """The Docker engine (a docker SDK client), with p2prc's base image."""
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
        client.images.get("p2prc/base:latest")
    except docker.errors.DockerException as err:
        require(False, f"no Docker engine or base image ({err}): scripts/docker-engine")
    return client


@pytest.fixture
def friend(tmp_path: Path, engine: object) -> Iterator[LiveServer]:
    """A real server named alice (home tmp_path/'host', no GPU plugin) that trusts the node
    whose home is tmp_path/'me'; the containers it started are removed after."""
    with friend_with(tmp_path, engine) as server:
        yield server


@contextlib.contextmanager
def friend_with(tmp_path: Path, engine: object, **env: str) -> Iterator[LiveServer]:
    """``friend``, with settings ``env`` (P2PRC_PUBLISH_PORTS="all", say)."""
    from p2prc_core.trust import TrustStore

    me = NodeIdentity.load_or_create(tmp_path / "me")
    TrustStore(tmp_path / "host").add(me.node_id, "me")
    server = start_server(tmp_path / "host", env={"P2PRC_DISABLE_PLUGINS": "nvidia",
                                                  "P2PRC_NAME": "alice", **env})
    node_id = server.node_id
    try:
        yield server
    finally:
        server.stop()
        for c in engine.containers.list(  # type: ignore[attr-defined]
                all=True, filters={"label": f"org.p2prc.node={node_id}"}):
            c.remove(force=True)


# A machine's interfaces as netifaces reports them, for tests of the address rules that must
# not depend on the machine they run on. "veth-gone" vanishes between listing and reading,
# as Docker's veths do while containers start.
FAKE_INTERFACES: dict[str, dict[int, list[dict[str, str]]]] = {
    "lo": {socket.AF_INET: [{"addr": "127.0.0.1"}], socket.AF_INET6: [{"addr": "::1"}]},
    "eth0": {socket.AF_INET: [{"addr": "192.168.7.5"}],
             socket.AF_INET6: [{"addr": "fe80::5%eth0"}, {"addr": "fd42::5"},
                               {"addr": "2a00:1450:4001::5"}]},
    "veth-gone": {},
    "wlan0": {socket.AF_INET: [{"addr": "8.8.4.4"}]},
    "docker0": {socket.AF_INET: [{"addr": "172.17.0.1"}]},  # never advertised
}


class FakeNetifaces:
    AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6

    @staticmethod
    def interfaces() -> list[str]:
        return list(FAKE_INTERFACES)

    @staticmethod
    def ifaddresses(name: str) -> dict[int, list[dict[str, str]]]:
        if name == "veth-gone":
            raise ValueError("You must specify a valid interface name.")
        return FAKE_INTERFACES[name]


@pytest.fixture
def fake_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees FAKE_INTERFACES instead of the machine's own."""
    monkeypatch.setitem(sys.modules, "netifaces", FakeNetifaces)


@pytest.fixture
def settings() -> Settings:
    return Settings(name="test-node")
