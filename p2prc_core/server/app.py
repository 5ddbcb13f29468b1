"""The Falcon app factory, used alike by tests and by the gunicorn workers."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon

from p2prc_core import __version__
from p2prc_core.client import PeerClient
from p2prc_core.config import Settings
from p2prc_core.containers import ContainerError, ContainerService
from p2prc_core.discovery import Discovery, HttpTransport, handle_exchange, refresh_job
from p2prc_core.errors import PeerError
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import parse_endpoint
from p2prc_core.node import TimedCache, record_fields
from p2prc_core.peertable import PeerTable
from p2prc_core.periodic import Periodic
from p2prc_core.plugins import PluginHooks
from p2prc_core.records import RecordError, RecordPublisher, verify_record
from p2prc_core.server import errors, openapi, resources
from p2prc_core.server.auth import RequestAuth
from p2prc_core.server.bodies import BodySizeLimit
from p2prc_core.trust import ServerState, TrustStore

log = logging.getLogger("p2prc.server")


@dataclass
class ServerContext:
    """Everything the resources need, built once per process."""

    settings: Settings
    hooks: PluginHooks
    home: Path
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.identity = NodeIdentity.load_or_create(self.home)
        self.publisher = RecordPublisher(self.home, self.identity)
        self.trust = TrustStore(self.home)
        self.state = ServerState(self.home)
        self.peers = PeerTable(self.home, self.identity.node_id, self.settings.allow_loopback,
                               self.settings.max_table_peers)
        self.peers.ensure()
        self._specs = TimedCache(self._collect_specs, self.settings.specs_cache_seconds)
        self._record = TimedCache(self._build_record, 30.0)
        self._backends = TimedCache(self.hooks.backends, float("inf"))
        self._containers: ContainerService | None = None

    def _collect_specs(self) -> tuple[dict[str, Any], bytes]:
        specs = self.hooks.collect_specs()
        return specs, json.dumps(specs).encode()

    def specs_json(self) -> bytes:
        result: bytes = self._specs.get()[1]
        return result

    def _build_record(self) -> dict[str, Any]:
        specs = self._specs.get()[0]
        return self.publisher.current(record_fields(self.settings, self.hooks, specs,
                                                    __version__))

    def node_record(self) -> dict[str, Any]:
        record: dict[str, Any] = self._record.get()
        return record

    def backends(self) -> dict[str, Any]:
        result: dict[str, Any] = self._backends.get()
        return result

    def containers(self) -> ContainerService:
        """The container service over the configured backend (built on first use)."""
        if self._containers is None:
            backend = self.backends().get(self.settings.backend)
            if backend is None:
                raise ContainerError(503, "No backend",
                                     f"The {self.settings.backend!r} backend is not "
                                     f"installed or was disabled: this host runs no "
                                     f"containers.")
            self._containers = ContainerService.open(self.settings, backend, self.home,
                                                     self.identity.node_id)
        return self._containers

    def start_reaper(self) -> Periodic:
        reaper = Periodic(self.home, "reap", self.settings.reap_seconds, self._reap)
        reaper.start()
        return reaper

    def _reap(self) -> list[str]:
        try:
            removed = self.containers().reap()
        except ContainerError:
            return []  # no backend, or the engine is down: nothing to reap now
        for container_id in removed:
            log.info("container %s expired and was removed", container_id[:12])
        return removed

    def exchange(self, body: Any) -> dict[str, Any]:
        return handle_exchange(self.peers, self.node_record(), body,
                               self.settings.max_records_per_response)

    def table_etag(self) -> str:
        snapshot = self.peers.snapshot()
        return f"{snapshot.cursor()}:{self.node_record()['seq']}"

    def discovery(self) -> Discovery:
        s = self.settings
        return Discovery(self.peers, self.hooks,
                         HttpTransport(s.request_timeout, s.max_table_bytes), self.node_record,
                         concurrency=s.update_concurrency, probes=s.latency_probes,
                         max_failures=s.peer_max_failures,
                         max_records=s.max_records_per_response)

    def bootstrap(self) -> None:
        """Add the configured bootstrap peers that the table does not hold yet."""
        held = {e.get("measured", {}).get("address") for e in self.peers.load().values()}
        for text in self.settings.bootstrap:
            endpoint = parse_endpoint(text)
            if str(endpoint) in held:
                continue
            try:
                with PeerClient(endpoint, self.settings.request_timeout) as client:
                    record = client.node()
                self.discovery().add(endpoint, record)
            except PeerError as err:
                log.warning("bootstrap peer %s: %s", endpoint, err)

    def start_refresher(self) -> Periodic | None:
        if not self.settings.refresh_seconds:
            return None
        job = refresh_job(self.discovery(), self.settings.update_hops, self.bootstrap)
        refresher = Periodic(self.home, "refresh", self.settings.refresh_seconds, job)
        refresher.start()
        return refresher

    def join(self, caller: str, secret: str, caller_record: Any) -> dict[str, Any]:
        """Redeem an invite for ``caller``; learn the caller's record if it sent a valid one."""
        self.state.redeem_invite(secret, caller)
        name = ""
        if caller_record is not None:
            try:
                verify_record(caller_record)
                if caller_record["node_id"] == caller:
                    name = caller_record["name"]
                    self.peers.merge([caller_record])
            except RecordError as err:
                log.info("join from %s: its record was not kept: %s", caller, err)
        self.trust.add(caller, name=name, via="invite")
        log.info("node %s (%s) joined with an invite and is now trusted", caller, name or "?")
        return {"trusted": True, "node": self.node_record()}


class NodeOnRequest:
    """Middleware: ``req.context.node_id`` is this node's id, for replies that name it."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.node_id = self.node_id


def create_app(context: ServerContext) -> falcon.App:
    settings = context.settings
    auth = RequestAuth(context.state, context.trust, settings.clock_window_seconds,
                       open_mode=settings.trust_mode == "open")
    middleware: list[Any] = [BodySizeLimit(settings.max_body_bytes), auth,
                             NodeOnRequest(context.identity.node_id)]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    compact = falcon.media.JSONHandler(dumps=functools.partial(
        json.dumps, separators=(",", ":"), ensure_ascii=False))
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = compact
    errors.install(app)
    app.add_error_handler(ContainerError, errors.handle_container_error)
    app.add_route("/v1/health", resources.HealthResource(context.started))
    app.add_route("/v1/node", resources.NodeResource(context.node_record))
    app.add_route("/v1/specs", resources.SpecsResource(context.specs_json))
    app.add_route("/v1/speedtest/download", resources.SpeedDownloadResource(
        settings.speedtest_default_bytes, settings.speedtest_max_bytes))
    app.add_route("/v1/speedtest/upload",
                  resources.SpeedUploadResource(settings.speedtest_max_bytes))
    app.add_route("/v1/images", resources.ImagesResource(context.backends,
                                                         settings.container_images))
    app.add_route("/v1/peers", resources.PeersResource(context.exchange, context.table_etag))
    app.add_route("/v1/containers", resources.ContainersResource(context.containers))
    app.add_route("/v1/containers/{container_id}",
                  resources.ContainerResource(context.containers))
    app.add_route("/v1/trust/me",
                  resources.TrustMeResource(context.trust.is_trusted, settings.trust_mode))
    app.add_route("/v1/trust/join", resources.TrustJoinResource(context.join))
    app.add_route("/v1/openapi.json",
                  resources.OpenAPIResource(lambda: openapi.build_document(app)))
    context.hooks.add_routes(app)
    return app
