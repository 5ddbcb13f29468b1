"""``p2prc version`` asks the Docker engine's version over its Unix socket, without the SDK
(``docker_version``): the real engine's answer is the SDK's, and whatever else answers on a
socket is said plainly, never printed raw."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prc_plugins.docker_version import EngineAnswer, version_at


@pytest.mark.docker
@pytest.mark.integration
def test_the_engines_version_is_what_the_sdk_says(engine: object) -> None:
    path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not path.startswith("unix://"):
        pytest.skip("the engine is not on a Unix socket here")  # (the SDK is asked then)
    assert version_at(path[len("unix://"):]) == engine.version()["Version"]  # type: ignore[attr-defined]


@pytest.fixture
def answering(tmp_path: Path) -> Iterator[list[bytes]]:
    """A Unix socket at tmp_path/'s' that answers each connection with the bytes given."""
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    answer: list[bytes] = [b""]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                try:
                    conn.sendall(answer[0])
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield answer
    server.close()


def http(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.0 " + status + b"\r\nContent-Type: application/json\r\n\r\n" + body


def test_an_engines_answer_gives_its_version(answering: list[bytes], tmp_path: Path) -> None:
    answering[0] = http(b"200 OK", b'{"Version": "27.3.1", "ApiVersion": "1.47"}')
    assert version_at(str(tmp_path / "s")) == "27.3.1"


@pytest.mark.parametrize("answer", [
    b"",                                                    # closed at once
    b"SSH-2.0-OpenSSH_9.2\r\n",                             # another server
    http(b"404 Not Found", b'{"message": "page not found"}'),
    http(b"200 OK", b"not json"),
    http(b"200 OK", b"[1, 2]"),
    http(b"200 OK", b'{"Version": 27}'),
    http(b"200 OK", b'{"Version": ""}'),
    http(b"200 OK", b'{"Version": "27\\u001b[31m red"}'),  # a terminal escape
    http(b"200 OK", b'{"Version": "' + b"9" * 65 + b'"}'),
    http(b"200 OK", b'{"Version": "1", "pad": "' + b"x" * (2 << 20) + b'"}'),  # endless
])
def test_what_is_not_an_engines_answer_is_said_plainly(answering: list[bytes], tmp_path: Path,
                                                      answer: bytes) -> None:
    answering[0] = answer
    with pytest.raises(EngineAnswer, match="answered|did not answer"):
        version_at(str(tmp_path / "s"))


def test_no_socket_is_an_os_error_with_its_cause(tmp_path: Path) -> None:
    with pytest.raises(OSError) as missing:
        version_at(str(tmp_path / "nothing here"))
    assert missing.value.errno == errno.ENOENT
