"""The baseline for bench_specs_rps: a bare Falcon hello-world app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import falcon

from p2prc_core.config import Settings


class Hello:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"hello": "world"}


def build_hello_app(settings: Settings, home: Path) -> Any:
    app = falcon.App()
    app.add_route("/v1/specs", Hello())
    return app
