"""What a stranger on the host's network can reach of a container, and what a container can
reach and fill of its host: against the real engine, with strangers and services in network
namespaces of the test's own."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_reach import wait_for

from conftest import P2PRC, LiveServer, require, start_server
from p2prc_core.identity import NodeIdentity
from p2prc_core.trust import TrustStore
from p2prc_plugins.docker_firewall import rules

pytestmark = [pytest.mark.docker, pytest.mark.integration]

# From another host: what a TCP connection to ADDRESS PORT gets (the first bytes, or why not).
PROBE = ("import socket, sys\n"
         "try:\n"
         "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)\n"
         "    s.settimeout(3)\n"
         "    print('open', s.recv(64))\n"
         "except OSError as err:\n"
         "    print('closed', err)\n")
# Inside a container: wait (up to 30 s) until something listens on the port.
WAIT_FOR_PORT = ("python3 -c 'import socket, time\nfor _ in range(300):\n    try:\n"
                 "        socket.create_connection((\"127.0.0.1\", {port}), 1).close(); break\n"
                 "    except OSError: time.sleep(0.1)\nelse: raise SystemExit(1)'")
# Whether something listens at ADDRESS PORT (a connect, nothing read).
LISTENS = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()\n"
           "    print('open')\n"
           "except OSError as err:\n"
           "    print('closed', err)\n")
FETCH = ("python3 -c 'import sys, urllib.request\n"
         "try:\n"
         "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
         "except OSError as err:\n"
         "    print(\"refused\", err)' {url}")


@contextmanager
def host_with(tmp_path: Path, engine: Any, **env: str) -> Iterator[LiveServer]:
    """A real server that trusts tmp_path/'me', with settings ``env``; its containers are
    removed after."""
    me = NodeIdentity.load_or_create(tmp_path / "me")
    home = tmp_path / "host"
    home.mkdir(exist_ok=True)
    TrustStore(home).add(me.node_id, "me")
    server = start_server(home, env={"P2PRC_DISABLE_PLUGINS": "nvidia", **env})
    try:
        yield server
    finally:
        server.stop()
        for found in engine.api.containers(all=True, filters={
                "label": f"org.p2prc.node={server.node_id}"}):
            engine.api.remove_container(found["Id"], force=True)


def me(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PRC, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "P2PRC_HOME": str(tmp_path / "me")})


def touch(tmp_path: Path, server: LiveServer, *args: str) -> dict[str, Any]:
    result = me(tmp_path, "touch", server.peer(), "--json", *args)
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def in_container(tmp_path: Path, container_id: str, command: str) -> str:
    result = me(tmp_path, "ssh", container_id[:12], command)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Any]:
    from netlab import NetLab, available

    reason = available()
    require(reason is None, reason or "")
    made = NetLab(tmp_path / "lab")
    try:
        yield made
    finally:
        made.close()


def probe_from(host: Any, address: str, port: int) -> str:
    result = subprocess.run(host.command("python3", "-c", PROBE, address, str(port)),
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def test_a_stranger_on_the_lan_reaches_no_container_port(tmp_path: Path, engine: Any,
                                                         lab: Any) -> None:
    stranger = lab.add_host("stranger")
    with host_with(tmp_path, engine) as server:
        reply = touch(tmp_path, server, "--ports", "1")
        assert reply["direct"] is False
        assert reply["ssh"]["command"] == f"p2prc ssh {reply['id'][:12]}"
        port = reply["ports"][1]["external"]
        in_container(tmp_path, reply["id"], f"cd /tmp && (python3 -m http.server {port} "
                     f"--bind :: </dev/null >/dev/null 2>&1 &) ; "
                     f"{WAIT_FOR_PORT.format(port=port)}")
        # The host's own loopback has them (the tunnel dials it) ...
        assert "SSH-2.0" in probe_from_root("127.0.0.1", reply["ssh"]["port"])
        # ... the stranger on the LAN has neither sshd nor the web service, on either family.
        for address in (f"{lab.v4_prefix}.1", f"{lab.v6_prefix}1"):
            for target in (reply["ssh"]["port"], port):
                assert probe_from(stranger, address, target).startswith("closed"), \
                    (address, target)
        # Its owner still gets in, through the host's p2prc port; --direct says why not.
        assert in_container(tmp_path, reply["id"], "echo in").strip() == "in"
        direct = me(tmp_path, "ssh", "--direct", reply["id"][:12], "true")
        assert direct.returncode != 0 and "loopback only" in direct.stderr
        human = me(tmp_path, "touch", server.peer())
        assert "on the host's loopback only" in human.stdout


def probe_from_root(address: str, port: int) -> str:
    result = subprocess.run(["python3", "-c", PROBE, address, str(port)], capture_output=True,
                            text=True, timeout=30)
    return result.stdout.strip()


def test_a_host_may_choose_to_publish_on_its_addresses(tmp_path: Path, engine: Any,
                                                       lab: Any) -> None:
    neighbour = lab.add_host("neighbour")
    with host_with(tmp_path, engine, P2PRC_PUBLISH_PORTS="all") as server:
        reply = touch(tmp_path, server, "--ports", "1")
        assert reply["direct"] is True and reply["published_reachable"] is True
        port = reply["ports"][1]["external"]
        assert reply["ports"][1]["internal"] == port
        in_container(tmp_path, reply["id"], f"mkdir -p /srv && echo p2prc-ok > /srv/index.html "
                     f"&& cd /srv && (python3 -m http.server {port} --bind :: "
                     f"</dev/null >/dev/null 2>&1 &) ; "
                     f"{WAIT_FOR_PORT.format(port=port)}")
        for address in (f"{lab.v4_prefix}.1", f"{lab.v6_prefix}1"):
            assert "SSH-2.0" in probe_from(neighbour, address, reply["ssh"]["port"])
            url = f"http://[{address}]:{port}/" if ":" in address else \
                f"http://{address}:{port}/"
            fetched = subprocess.run(neighbour.command("sh", "-c", FETCH.format(url=url)),
                                     capture_output=True, text=True, timeout=60)
            assert fetched.stdout.strip() == "p2prc-ok", (address, fetched.stderr)
        direct = me(tmp_path, "ssh", "--direct", reply["id"][:12], "echo direct")
        assert direct.returncode == 0 and direct.stdout.strip() == "direct", direct.stderr
        # After a restart the host still knows which it published where.
        server.stop()
        again = start_server(server.home, env={"P2PRC_DISABLE_PLUGINS": "nvidia"},
                             port=server.port)
        try:
            listed = json.loads(me(tmp_path, "containers", "ls", "--json").stdout)
            assert [c["direct"] for c in listed] == [True]
        finally:
            again.stop()


@contextmanager
def metadata_service(tmp_path: Path) -> Iterator[str]:
    """A fake cloud metadata service at 169.254.169.254, in a namespace of its own that the
    host routes to (as a cloud VM's host routes to its provider's)."""
    import secrets

    from netlab import run

    tag = secrets.token_hex(2)
    namespace, outer, inner = f"p2prc-md-{tag}", f"p2md{tag}a", f"p2md{tag}b"
    run("ip", "netns", "add", namespace)
    server = None
    try:
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        run("ip", "link", "set", inner, "netns", namespace)
        run("ip", "addr", "add", "169.254.169.1/32", "dev", outer)
        run("ip", "link", "set", outer, "up")
        run("ip", "route", "add", "169.254.169.254/32", "dev", outer)
        inside = ["ip", "netns", "exec", namespace]
        run(*inside, "ip", "link", "set", "lo", "up")
        run(*inside, "ip", "addr", "add", "169.254.169.254/32", "dev", inner)
        run(*inside, "ip", "link", "set", inner, "up")
        run(*inside, "ip", "route", "add", "169.254.169.1/32", "dev", inner)
        root = tmp_path / "metadata"
        (root / "latest").mkdir(parents=True)
        (root / "latest" / "credentials").write_text("AKIA-FAKE-HOST-CREDENTIALS\n")
        server = subprocess.Popen([*inside, "python3", "-m", "http.server", "80", "--bind",
                                   "169.254.169.254", "--directory", str(root)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if "open" in subprocess.run(
                    [*inside, "python3", "-c", LISTENS, "169.254.169.254", "80"],
                    capture_output=True, text=True, timeout=30).stdout:
                break
        # The host itself reaches it: what a container must not.
        assert b"AKIA" in subprocess.run(
            ["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
             "'http://169.254.169.254/latest/credentials', timeout=5).read())"],
            capture_output=True, timeout=30).stdout
        yield "http://169.254.169.254/latest/credentials"
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        run("ip", "netns", "del", namespace, check=False)
        run("ip", "link", "del", outer, check=False)


def test_containers_do_not_reach_a_metadata_service_routed_through_the_host(
        tmp_path: Path, engine: Any, lab: Any) -> None:
    with metadata_service(tmp_path) as url, host_with(tmp_path, engine) as server:
        reply = touch(tmp_path, server)
        seen = in_container(tmp_path, reply["id"], FETCH.format(url=url))
        assert "AKIA" not in seen and seen.startswith("refused"), seen


def test_containers_reach_the_lan_unless_the_host_says_no(tmp_path: Path, engine: Any,
                                                          lab: Any) -> None:
    neighbour = lab.add_host("neighbour")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("lan-page\n")
    web = subprocess.Popen(neighbour.command("python3", "-m", "http.server", "8080", "--bind",
                                             "0.0.0.0", "--directory",
                                             str(tmp_path / "www")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    neighbour.processes.append(web)
    url = f"http://{neighbour.ipv4}:8080/"
    for _ in range(100):
        if subprocess.run(neighbour.command("python3", "-c", LISTENS, neighbour.ipv4, "8080"),
                          capture_output=True, text=True, timeout=30).stdout.startswith("open"):
            break
    with host_with(tmp_path, engine) as server:
        reply = touch(tmp_path, server)
        assert in_container(tmp_path, reply["id"], FETCH.format(url=url)).strip() == "lan-page"
    with host_with(tmp_path, engine, P2PRC_CONTAINERS_REACH_LAN="false") as server:
        reply = touch(tmp_path, server)
        assert in_container(tmp_path, reply["id"], FETCH.format(url=url)).startswith("refused")
    # The next create with the default lets the LAN in again (the rules are taken out).
    with host_with(tmp_path, engine) as server:
        reply = touch(tmp_path, server)
        assert in_container(tmp_path, reply["id"], FETCH.format(url=url)).strip() == "lan-page"


def test_a_container_fills_neither_the_hosts_disk_nor_its_log(tmp_path: Path,
                                                              engine: Any) -> None:
    with host_with(tmp_path, engine, P2PRC_CONTAINER_DISK="64M",
                   P2PRC_CONTAINER_LOG_BYTES="1M") as server:
        reply = touch(tmp_path, server)
        out = in_container(tmp_path, reply["id"],
                           "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>&1; "
                           "(echo x > /fill) 2>&1; "
                           "head -c 8000000 /dev/zero | tr '\\0' a > /proc/1/fd/1; echo done")
        assert "No space left on device" in out
        assert "Read-only file system" in out and out.strip().endswith("done")
        [listed] = engine.api.containers(all=True, size=True, filters={"id": reply["id"]})
        assert listed.get("SizeRw", 0) < 1 << 20  # nothing of it on the host's disk
        log_path = Path(engine.api.inspect_container(reply["id"])["LogPath"])
        # The engine rotates the log at its limit: for a moment the file may not be there.
        [log_size] = wait_for(lambda: _size(log_path), what="the container's log file")
        assert log_size <= (1 << 20) + (64 << 10), log_size
        # What it wrote in the limit is still its own to use.
        assert in_container(tmp_path, reply["id"], "ls -s /tmp/fill").split()[0] != "0"


def _size(path: Path) -> tuple[int] | None:
    """``(size,)`` of ``path`` (an empty file too), or None while it is not there."""
    try:
        return (path.stat().st_size,)
    except FileNotFoundError:
        return None


def test_creates_are_refused_while_the_engines_disk_is_low(tmp_path: Path,
                                                           engine: Any) -> None:
    with host_with(tmp_path, engine, P2PRC_MIN_FREE_DISK="1000000G") as server:
        result = me(tmp_path, "touch", server.peer())
        assert result.returncode != 0
        assert "disk for containers has" in result.stderr and "floor" in result.stderr
        assert not engine.api.containers(all=True, filters={
            "label": f"org.p2prc.node={server.node_id}"})


def test_the_firewall_rules_cover_every_metadata_address() -> None:
    v4 = " ".join(" ".join(rule) for _, rule in rules("p2prc0", True))
    v6 = " ".join(" ".join(rule) for _, rule in rules("p2prc0", True, v6=True))
    assert "169.254.0.0/16" in v4 and "100.100.100.200/32" in v4
    assert "168.63.129.16/32 -p tcp -m multiport --dports 80,32526" in v4  # not its DNS
    assert "fd00:ec2::254/128" in v6
    assert "-o p2prc0 -j DROP" in v6  # container to container over IPv6
    lan = [rule for want, rule in rules("p2prc0", False) if "10.0.0.0/8" in rule]
    assert lan and all(want for want, rule in rules("p2prc0", False) if rule in lan)


def test_rules_p2prc_no_longer_makes_are_taken_out(engine: Any) -> None:
    """A rule an older version tagged, that this one does not make, goes at the next create
    (here: the next guard); the wanted ones stay, and a second guard changes nothing."""
    import shutil

    from p2prc_plugins.docker_firewall import guard

    require(os.geteuid() == 0 and shutil.which("iptables") is not None,
            "iptables as root is needed")
    old = ["DOCKER-USER", "-i", "p2prc0", "-d", "192.0.2.1/32", "-m", "comment",
           "--comment", "p2prc-000000000000", "-j", "REJECT"]
    assert subprocess.run(["iptables", "-I", *old]).returncode == 0
    try:
        assert guard("p2prc0", True) is None
        listing = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
        assert "p2prc-000000000000" not in listing
        assert all(rule[-1] in listing for want, rule in rules("p2prc0", True) if want)
        assert guard("p2prc0", True) is None
        assert subprocess.run(["iptables", "-S"], capture_output=True,
                              text=True).stdout == listing
    finally:
        subprocess.run(["iptables", "-D", *old], capture_output=True)


def test_rules_a_firewall_reload_dropped_are_put_back_while_containers_run(
        tmp_path: Path, engine: Any) -> None:
    """As after 'ufw reload': the rules go, and the server's reaper puts them back."""
    import time

    with host_with(tmp_path, engine, P2PRC_REAP_SECONDS="0.5") as server:
        touch(tmp_path, server)
        metadata = next(rule for want, rule in rules("p2prc0", True)
                        if want and "169.254.0.0/16" in rule)

        def listing() -> str:
            return subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout

        line = next(x for x in listing().splitlines() if metadata[-1] in x)
        assert subprocess.run(["iptables", "-D", *line.split()[1:]]).returncode == 0
        deadline = time.monotonic() + 30
        while metadata[-1] not in listing():
            assert time.monotonic() < deadline, "the rule did not come back"
            time.sleep(0.2)
