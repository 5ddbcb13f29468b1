"""``import p2prc``: the documented example run as it is written in docs/python.md, against a
real server and a real container; commands, forwarded ports and removal on a real
container; filters and errors on a planted table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import LiveServer
from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.records import sign_record

ROOT = Path(__file__).resolve().parent.parent


def example() -> str:
    text = (ROOT / "docs" / "python.md").read_text()
    section = text.split("## A complete example", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "docs/python.md has no example"
    return found.group(1)


@pytest.mark.docker
@pytest.mark.integration
def test_the_documented_example_runs(tmp_path: Path, friend: LiveServer,
                                     engine: Any) -> None:
    script = tmp_path / "example.py"
    script.write_text(example())
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "P2PRC_HOME": str(tmp_path / "me"),
                                           "FRIEND": friend.peer()})
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith(f"using friend ({friend.node_id}) at 127.0.0.1:{friend.port}")
    assert lines[1] == f"Linux {os.uname().machine}"  # uname -sm, in the container
    # It cleaned up: nothing of this host's left on the engine, nothing tracked.
    assert engine.containers.list(
        all=True, filters={"label": f"org.p2prc.node={friend.node_id}"}) == []
    import p2prc

    assert p2prc.Node.open(tmp_path / "me").containers() == []


@pytest.mark.docker
@pytest.mark.integration
def test_a_container_runs_commands_and_forwards_a_port(tmp_path: Path, friend: LiveServer,
                                                       engine: Any) -> None:
    import p2prc

    node = p2prc.Node.open(tmp_path / "me")
    alice = node.add_peer(friend.peer())
    box = node.touch(alice, ports=1, memory="256M", ttl="10m")
    try:
        assert [c.id for c in node.containers()] == [box.id]
        assert node.containers()[0].state == "running"
        assert box.run("echo out; echo err >&2; exit 4") == p2prc.CommandResult(
            "echo out; echo err >&2; exit 4", 4, "out\n", "err\n")
        with pytest.raises(p2prc.P2PRCError, match="exited 4: err"):
            box.run("echo err >&2; exit 4", check=True)
        port = box.ports[1]["internal"]
        box.run(f"mkdir -p /srv && echo api-ok > /srv/index.html && cd /srv && "
                f"(setsid python3 -m http.server {port} >/dev/null 2>&1 &)", check=True)
        with box.forward(port) as local:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{local}/",
                                                timeout=5) as reply:
                        assert reply.read() == b"api-ok\n"
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        with pytest.raises(p2prc.P2PRCError, match="not 1234"):
            with box.forward(1234):
                pass
        assert "<td>" in box._repr_html_() and box.short_id in repr(box)
    finally:
        assert box.remove() is True
    assert engine.containers.list(all=True, filters={"id": box.id}) == []
    with pytest.raises(p2prc.P2PRCError):
        node.container(box.id)  # forgotten


def plant(home: Path, node_id: str, name: str, **specs: Any) -> str:
    identity = NodeIdentity.generate()
    PeerTable(home, node_id, allow_loopback=True).merge([sign_record(identity, {
        "name": name, "addresses": ["fd42::1"], "port": 8088, "seq": 1,
        "time": int(time.time()), "specs": specs, "metadata": {}, "version": "x"})])
    return identity.node_id


def test_peers_filter_and_errors_read_as_the_cli_says_them(tmp_path: Path) -> None:
    import p2prc

    node = p2prc.Node.open(tmp_path / "me")
    plant(node.home, node.node_id, "big", gpus=["H200"], gpus_free=1, memory=64 << 30)
    plant(node.home, node.node_id, "taken", gpus=["H200"], gpus_free=0, memory=8 << 30)
    plant(node.home, node.node_id, "<i>small</i>", memory="lots")
    assert {p.name for p in node.peers()} == {"big", "taken", "<i>small</i>"}
    assert [p.name for p in node.peers(gpu=True)] == ["big"]
    assert [p.name for p in node.peers(min_memory="16G")] == ["big"]
    assert node.peers(max_latency_ms=100) == [] and node.peers(reachable=True) == []
    assert node.peer("big").gpus == ("H200",) and node.peer("big").memory == 64 << 30
    assert node.peer("<i>small</i>").memory is None  # a record's odd value is no number
    shown = node.peers()._repr_html_()
    assert "&lt;i&gt;small&lt;/i&gt;" in shown and "<i>" not in shown
    with pytest.raises(p2prc.P2PRCError, match="did you mean 'big'"):
        node.peer("bog")
    with pytest.raises(p2prc.PeerError):
        node.add_peer("127.0.0.1:1")  # nothing listens there
    with pytest.raises(p2prc.P2PRCError, match="not a size"):
        node.peers(min_memory="lots")
    with pytest.raises(p2prc.P2PRCError, match="not a duration"):
        node.touch("big", ttl="a while")
    assert node.peer(node.peer("big")).name == "big"  # a Peer will do where text does
    # Every mistake is a P2PRCError with a message, never a TypeError from deep inside.
    for mistake in (lambda: node.add_peer("127.0.0.1:99999"), lambda: node.add_peer(""),
                    lambda: node.add_peer(None),  # type: ignore[arg-type]
                    lambda: node.specs("[fd00::1"), lambda: node.touch("big", memory=1.5),
                    lambda: node.touch("big", ttl=True), lambda: node.update(hops="x"),
                    lambda: node.update(hops=-1), lambda: node.peers(min_memory=[1]),
                    lambda: p2prc.Node.open(tmp_path / "me", no_such_setting=1),
                    lambda: p2prc.Node.open(tmp_path / "me", request_timeout="fast")):
        with pytest.raises(p2prc.P2PRCError) as caught:
            mistake()
        assert type(caught.value).__module__.startswith("p2prc"), caught.value
    (tmp_path / "file").write_text("not a home")
    with pytest.raises(p2prc.P2PRCError, match="as a node's home"):
        p2prc.Node.open(tmp_path / "file")


# What a peer chose (its name, GPU names), or a host said, reaches a terminal or a notebook
# through print(), repr() and _repr_html_: title, clear-screen, clipboard writes (OSC 52),
# bidirectional overrides.
HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\u202e\x9b31m\n"


def shows_nothing_hostile(text: str) -> None:
    assert not any(c in text for c in "\x1b\x07\x9b\u202e\n"), repr(text)
    assert "evil" in text


def test_what_a_peer_chose_is_printed_clean(tmp_path: Path) -> None:
    import p2prc
    from p2prc.api import Container, Run
    from p2prc_core.my_containers import RemoteContainer

    node = p2prc.Node.open(tmp_path / "me")
    plant(node.home, node.node_id, HOSTILE, gpus=[HOSTILE], gpus_free=1)
    [peer] = node.peers()
    for shown in (str(peer), repr(peer), f"using {peer}", peer._repr_html_(),
                  node.peers()._repr_html_()):
        shows_nothing_hostile(shown)
    remote = RemoteContainer(id="ab" * 32, endpoint=HOSTILE, host="127.0.0.1", ssh_port=42000,
                             host_key="ssh-ed25519 AAAA", ports=[], image="x", created=0,
                             expires=0)
    container = Container(node, remote, state=HOSTILE)
    for shown in (repr(container), str(container), container._repr_html_()):
        shows_nothing_hostile(shown)
    run = Run.from_record({"id": "1", "playbook": HOSTILE, "hosts": {
        HOSTILE: {"container": "ab" * 6, "status": HOSTILE, "task": HOSTILE}}})
    shows_nothing_hostile(run._repr_html_())
