"""The tunnel starts fast (issue 27): the ProxyCommand helper loads only what it uses, and
``p2prc ssh``, ``ssh-config`` and ``p2prc run`` share one SSH connection per container, so
only a first connection starts a helper. Checked by the modules a fresh helper holds and by
the helpers that run, not by milliseconds (timings are bench/bench_tunnel_ssh.py's)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import P2PRC, LiveServer, free_port, require, start_server, web
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.my_containers import RemoteContainer, Tracked
from p2prc_core.tasks import RunTarget
from p2prc_core.trust import TrustStore
from p2prc_core.tunnel import (
    container_control_path,
    control_path,
    helper_command,
    helper_home,
    ssh_command,
)
from p2prc_plugins.ansible import build_inventory

# What the helper must not pay for at its start: the CLI, the HTTP client, the plugins.
SLOW = {"click", "rich", "httpx", "httpcore", "anyio", "pluggy", "docker", "importlib.metadata",
        "p2prc_core.httplib", "p2prc_core.plugins", "p2prc_core.services", "p2prc_core.cli"}
# ... nor, on its quick way (the first path written works), asyncio, the HTTP parser, the
# wire's definitions, cryptography's X.509 and serialization modules or the peer table.
QUICK = {*SLOW, "asyncio", "h11", "msgspec", "cryptography.x509",
         "cryptography.hazmat.primitives.serialization", "p2prc_core.wire",
         "p2prc_core.peertable", "p2prc_core.tunnel_streams"}
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq0aXzLw3DYCr4tUJqlzCw1zFyW4rsH4FkvKcsh1L2a"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFvS0o9dTk2M2YxZmY4N2JlOGQ3YjQ0ZWY1NzQ5ZDc5"

# Runs the helper as OpenSSH does (``python -m p2prc_core.tunnel ...``), then writes the
# modules it held to the file named by the first argument.
RUN_AND_LIST = """\
import atexit, json, runpy, sys
listing = sys.argv.pop(1)
atexit.register(lambda: json.dump(sorted(sys.modules), open(listing, "w")))
runpy.run_module("p2prc_core.tunnel", run_name="__main__", alter_sys=True)
"""


def container(host_key: str = HOST_KEY) -> RemoteContainer:
    return RemoteContainer(id="c" * 64, endpoint="127.0.0.1:8088", host="127.0.0.1",
                           ssh_port=42000, host_key=host_key,
                           ports=[{"name": "ssh", "internal": 22, "external": 42000}],
                           image="p2prc/base:latest", created=0, expires=1)


def helper_modules(tmp_path: Path, command: str) -> tuple[set[str], str, str]:
    """The modules a fresh helper held when it ended, what it said, and what it passed on
    (its standard input is closed at once: it ends a second after it connected)."""
    listing = tmp_path / "modules.json"
    words = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PRC_")}
    done = subprocess.run([words[0], "-c", RUN_AND_LIST, str(listing), *words[3:]],
                          capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)
    return set(json.loads(listing.read_text())), done.stderr, done.stdout


def loaded(modules: set[str], unwanted: set[str]) -> set[str]:
    return {m for m in modules if any(m == u or m.startswith(u + ".") for u in unwanted)}


@pytest.fixture
def host(tmp_path: Path) -> Any:
    """A live host that trusts tmp_path/'me', in me's table (as after 'p2prc peers add')."""
    me = NodeIdentity.load_or_create(tmp_path / "me")
    TrustStore(tmp_path / "host").add(me.node_id, "me")
    server = start_server(tmp_path / "host")
    try:
        added = subprocess.run([P2PRC, "peers", "add", server.peer()], capture_output=True,
                               text=True, timeout=60,
                               env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})
        assert added.returncode == 0, added.stderr
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("dead_path_first", [False, True])
def test_the_helper_loads_no_cli_http_client_or_plugins(tmp_path: Path, host: LiveServer,
                                                        dead_path_first: bool) -> None:
    """The whole way to the host (the table, TLS, the signed upgrade: the host answers 404
    for a container it does not run), also after a path that does not answer (from a home
    whose table does not know the host: the paths written in the command, in their order)."""
    paths = [Endpoint("127.0.0.1", host.port, host.node_id)]
    home = tmp_path / "me"
    if dead_path_first:
        paths.insert(0, Endpoint("127.0.0.1", free_port(), host.node_id))
        home = tmp_path / "stranger"
    command = helper_command(home, "d" * 64, 22, paths, timeout=5)
    modules, said, _ = helper_modules(tmp_path, command)
    assert f"127.0.0.1:{host.port} refused (40" in said, said  # it went all the way
    assert not loaded(modules, SLOW), said


def test_a_first_path_where_another_node_answers_is_passed_for_the_next(
        tmp_path: Path, host: LiveServer) -> None:
    """The address written first now belongs to another node (not named by the user): the
    helper says nothing to it and goes on to the next path, where the host answers."""
    stranger = start_server(tmp_path / "stranger")
    try:
        web.get(stranger.url() + "/v1/health")  # the access log works: it names this one
        paths = [Endpoint("127.0.0.1", stranger.port, host.node_id),
                 Endpoint("127.0.0.1", host.port, host.node_id)]
        command = helper_command(tmp_path / "me", "d" * 64, 22, paths, timeout=5)
        _, said, _ = helper_modules(tmp_path, command)
    finally:
        stranger.stop()
    assert f"127.0.0.1:{host.port} refused (404)" in said, said
    assert "/v1/health" in stranger.output() and "/v1/containers" not in stranger.output()


# -- one connection per container ------------------------------------------------------------

def test_ssh_through_the_tunnel_shares_one_connection_per_container(tmp_path: Path) -> None:
    home = tmp_path / "me"
    argv = ssh_command(home, container(), home / "ssh" / "id_ed25519")
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    control = container_control_path(home, "c" * 64, HOST_KEY)
    assert {"ControlMaster=auto", f"ControlPath={control}", "ControlPersist=60"} <= \
        set(options)
    assert stat.S_IMODE(control.parent.stat().st_mode) == 0o700
    # Straight to the published port: a connection of its own, as before.
    direct = ssh_command(home, container(), home / "ssh" / "id_ed25519", tunnel=False)
    assert not any(word.startswith("Control") for word in direct)


def test_a_connection_is_only_shared_for_the_host_key_it_checked(tmp_path: Path) -> None:
    home = tmp_path / "me"
    assert container_control_path(home, "c" * 64, HOST_KEY) != \
        container_control_path(home, "c" * 64, OTHER_KEY)
    assert container_control_path(home, "c" * 64, HOST_KEY) != \
        container_control_path(home, "e" * 64, HOST_KEY)


def test_the_connection_is_in_the_homes_ssh_folder_made_private() -> None:
    with tempfile.TemporaryDirectory(prefix="p2prc-") as short:  # tmp_path is too long
        home = Path(short) / "me"
        (home / "ssh").mkdir(parents=True)
        (home / "ssh").chmod(0o755)
        control = container_control_path(home, "c" * 64, HOST_KEY)
        assert control.parent == home / "ssh"
        assert stat.S_IMODE((home / "ssh").stat().st_mode) == 0o700


@pytest.mark.parametrize("home", ["long/" * 20, "odd%hhome"])
def test_a_control_path_too_long_or_with_a_percent_goes_to_a_short_private_folder(
        tmp_path: Path, home: str) -> None:
    path = control_path(tmp_path / home, "0123456789ab-0123abcd")
    assert len(str(path)) + 17 < 100 and "%" not in str(path)
    assert path.parent.stat().st_uid == os.getuid()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_helper_home_reads_back_the_helpers_home_only(tmp_path: Path) -> None:
    command = helper_command(tmp_path / "a home", "c" * 64, 22,
                             [Endpoint("127.0.0.1", 8088, "n" * 26)])
    assert helper_home(command) == tmp_path / "a home"
    assert helper_home("nc %h %p") is None
    assert helper_home("'unbalanced") is None


def test_ansible_shares_the_containers_connection_through_the_tunnel(tmp_path: Path) -> None:
    home = tmp_path / "me"
    proxy = helper_command(home, "c" * 64, 22, [Endpoint("127.0.0.1", 8088, "n" * 26)])

    def target(proxy_command: str | None) -> RunTarget:
        return RunTarget(name="c" * 12, container_id="c" * 64, address="127.0.0.1",
                         port=42000, user="root", private_key=home / "key", host_key=HOST_KEY,
                         ports=[], proxy_command=proxy_command)

    hosts = build_inventory([target(proxy)], tmp_path / "run")["all"]["children"]["p2prc"][
        "hosts"]
    args = shlex.split(hosts["c" * 12]["ansible_ssh_args"])
    control = container_control_path(home, "c" * 64, HOST_KEY)
    assert f"ControlPath={control}" in args and "ControlMaster=auto" in args
    assert "ControlPersist=60s" in args
    for other in (None, "nc %h %p"):  # Ansible's own defaults
        hosts = build_inventory([target(other)], tmp_path / "run")["all"]["children"][
            "p2prc"]["hosts"]
        assert "ansible_ssh_args" not in hosts["c" * 12]


# -- against the real engine ------------------------------------------------------------------

def helpers(home: Path) -> set[int]:
    """The tunnel helpers running for ``home`` (their pids)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        if b"p2prc_core.tunnel" in words and str(home).encode() in words:
            found.add(int(entry.name))
    return found


def until(check: Callable[[], subprocess.CompletedProcess[str]]
          ) -> subprocess.CompletedProcess[str]:
    """``check`` again while ssh fails to connect (255: sshd may still be starting)."""
    deadline = time.monotonic() + 15
    while True:
        result = check()
        if result.returncode != 255 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def touched_on(friend: LiveServer, me: Path) -> str:
    """The id of a container ``me`` touched on ``friend``."""
    touched = subprocess.run([P2PRC, "touch", friend.peer(), "--json"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "P2PRC_HOME": str(me)})
    assert touched.returncode == 0, touched.stderr
    container_id: str = json.loads(touched.stdout)["id"]
    return container_id


def test_a_second_ssh_starts_no_helper_and_opens_no_tunnel(tmp_path: Path,
                                                          friend: LiveServer) -> None:
    me = tmp_path / "me"
    env = {**os.environ, "P2PRC_HOME": str(me)}
    short = touched_on(friend, me)[:12]

    def ssh(*command: str) -> subprocess.CompletedProcess[str]:
        # capture_output: the helper that lives on must not hold our pipes open
        return subprocess.run(list(command), capture_output=True, text=True, timeout=30,
                              env=env, stdin=subprocess.DEVNULL)

    first = until(lambda: ssh(P2PRC, "ssh", short, "hostname"))
    assert first.returncode == 0 and first.stdout.strip() == short, first.stderr
    tunnels = friend.output().count(f"tunnel to {short} port 22")
    alive = helpers(me)
    assert len(alive) == 1  # the connection stays for the next one
    second = ssh(P2PRC, "ssh", short, "true")
    assert second.returncode == 0, second.stderr
    assert helpers(me) == alive
    assert friend.output().count(f"tunnel to {short} port 22") == tunnels
    # An ssh-config entry (plain OpenSSH: scp, VS Code) shares it too.
    assert ssh(P2PRC, "ssh-config", "--write").returncode == 0
    plain = ssh("ssh", "-F", str(me / "ssh" / "config"), f"p2prc-{short}", "true")
    assert plain.returncode == 0, plain.stderr
    assert helpers(me) == alive
    assert friend.output().count(f"tunnel to {short} port 22") == tunnels
    # Ending the connection ends its helper.
    ssh("ssh", "-F", str(me / "ssh" / "config"), "-O", "exit", f"p2prc-{short}")
    deadline = time.monotonic() + 10
    while helpers(me) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not helpers(me)


def test_the_helpers_quick_way_reaches_sshd_with_a_lean_start(tmp_path: Path,
                                                               friend: LiveServer) -> None:
    me = tmp_path / "me"
    container_id = touched_on(friend, me)
    command = helper_command(me, container_id, 22,
                             [Endpoint("127.0.0.1", friend.port, friend.node_id)], timeout=10)
    deadline = time.monotonic() + 15
    while True:  # sshd may still be starting: the stream then ends without a banner
        modules, said, passed = helper_modules(tmp_path, command)
        if passed.startswith("SSH-2.0-") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert passed.startswith("SSH-2.0-"), said
    assert not loaded(modules, QUICK), loaded(modules, QUICK)


def test_ssh_on_a_terminal_still_says_why_the_tunnel_failed(tmp_path: Path) -> None:
    """A host that does not answer: the helper's one line reaches the user's terminal,
    though OpenSSH gives a ProxyCommand no standard error under ControlPersist."""
    require(shutil.which("script") is not None, "script (util-linux) is missing")
    me = tmp_path / "me"
    closed = free_port()
    record = container()
    Tracked(me).add(RemoteContainer(**{**record.__dict__, "endpoint": f"127.0.0.1:{closed}",
                                       "node_id": NodeIdentity.generate().node_id}))
    env = {**os.environ, "P2PRC_HOME": str(me), "P2PRC_REQUEST_TIMEOUT": "2"}
    assert subprocess.run([P2PRC, "ssh-config", "--write"], env=env, timeout=60,
                          capture_output=True).returncode == 0
    ssh = shlex.join(["ssh", "-F", str(me / "ssh" / "config"), f"p2prc-{record.short_id}",
                      "true"])
    result = subprocess.run(["script", "-qec", ssh, "/dev/null"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 255
    assert "p2prc tunnel: no path to the host works" in result.stdout, result.stdout
    assert f"127.0.0.1:{closed}" in result.stdout
