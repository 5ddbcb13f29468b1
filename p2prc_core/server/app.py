"""The Falcon app factory, used alike by tests and by the gunicorn workers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import falcon

from p2prc_core import __version__
from p2prc_core.config import Settings
from p2prc_core.node import TimedCache, advertisable, local_addresses, ordered_by_preference
from p2prc_core.plugins import PluginHooks
from p2prc_core.server import errors, openapi, resources
from p2prc_core.server.bodies import BodySizeLimit


@dataclass
class ServerContext:
    """Everything the resources need, built once per process."""

    settings: Settings
    hooks: PluginHooks
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._specs = TimedCache(self._collect_specs_json, self.settings.specs_cache_seconds)
        self._addresses = TimedCache(self._choose_addresses, 30.0)
        self._backends = TimedCache(self.hooks.backends, float("inf"))

    def _collect_specs_json(self) -> bytes:
        return json.dumps(self.hooks.collect_specs()).encode()

    def specs_json(self) -> bytes:
        result: bytes = self._specs.get()
        return result

    def _choose_addresses(self) -> list[str]:
        found = advertisable(local_addresses(), self.settings)
        return [str(a) for a in ordered_by_preference(self.hooks, found, "advertise")]

    def describe_node(self) -> dict[str, Any]:
        addresses = self._addresses.get()
        return {"name": self.settings.display_name, "version": __version__,
                "port": self.settings.port, "address": addresses[0] if addresses else None,
                "addresses": addresses}

    def backends(self) -> dict[str, Any]:
        result: dict[str, Any] = self._backends.get()
        return result


def create_app(context: ServerContext) -> falcon.App:
    settings = context.settings
    app = falcon.App(middleware=[BodySizeLimit(settings.max_body_bytes)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    app.add_route("/v1/health", resources.HealthResource(context.started))
    app.add_route("/v1/node", resources.NodeResource(context.describe_node))
    app.add_route("/v1/specs", resources.SpecsResource(context.specs_json))
    app.add_route("/v1/speedtest/download", resources.SpeedDownloadResource(
        settings.speedtest_default_bytes, settings.speedtest_max_bytes))
    app.add_route("/v1/speedtest/upload",
                  resources.SpeedUploadResource(settings.speedtest_max_bytes))
    app.add_route("/v1/images", resources.ImagesResource(context.backends))
    app.add_route("/v1/openapi.json",
                  resources.OpenAPIResource(lambda: openapi.build_document(app)))
    context.hooks.add_routes(app)
    return app
