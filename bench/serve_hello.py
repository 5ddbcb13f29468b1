"""Serve the bare hello-world app under exactly the gunicorn settings p2prc uses."""

from __future__ import annotations

import sys

from p2prc_core.config import load_settings
from p2prc_core.server.run import PeerServer, bind_socket

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from hello_app import build_hello_app  # noqa: E402

if __name__ == "__main__":
    loaded = load_settings()
    sock = bind_socket(loaded.settings.host, int(sys.argv[1]))
    PeerServer(loaded.settings, loaded.home, sock, build_hello_app).run()
