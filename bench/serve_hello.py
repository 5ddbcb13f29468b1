"""Serve the bare hello-world app under exactly the gunicorn settings p2prc uses.

Usage: serve_hello.py PORT [gthread]: with "gthread", under gunicorn's own gthread worker
instead of p2prc's (server.front), for bench_front.py."""

from __future__ import annotations

import sys

from p2prc_core.config import load_settings
from p2prc_core.server.run import PeerServer, bind_socket

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from hello_app import build_hello_app  # noqa: E402


class GthreadServer(PeerServer):
    """The same, with gunicorn's own worker."""

    def load_config(self) -> None:
        super().load_config()
        self.cfg.set("worker_class", "gthread")


if __name__ == "__main__":
    loaded = load_settings()
    sock = bind_socket(loaded.settings.host, int(sys.argv[1]))
    server = GthreadServer if sys.argv[2:] == ["gthread"] else PeerServer
    server(loaded.settings, loaded.home, sock, build_hello_app).run()
