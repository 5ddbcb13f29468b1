"""The Falcon app factory, used alike by tests and by the gunicorn workers."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import falcon

from p2prc_core.config import Settings
from p2prc_core.errors import Refusal
from p2prc_core.reach_state import ReachedAt
from p2prc_core.relayhub import RelayHub
from p2prc_core.server import errors, exec_stream, openapi, relay, resources, streams
from p2prc_core.server.auth import RequestAuth
from p2prc_core.server.bodies import BodySizeLimit
from p2prc_core.server.punching import PunchResource
from p2prc_core.server.upgrade import Held
from p2prc_core.services import NodeServices

log = logging.getLogger("p2prc.server")


class NodeOnRequest:
    """Middleware: ``req.context.node_id`` is this node's id, for replies that name it."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.node_id = self.node_id


DIAL_BACKS = 2  # dial-backs (POST /v1/reach) at once per worker, on threads of their own


def worker_threads(settings: Settings) -> int:
    """gunicorn's threads per worker: ``threads``, the dial-backs' own, and a relay's own for
    its polls and streams (budgets apart in ``create_app``)."""
    relaying = settings.relay_poll_threads + settings.relay_stream_threads
    return settings.threads + DIAL_BACKS + (relaying if settings.relay else 0)


def create_app(node: NodeServices) -> falcon.App:
    """The peer API over one node's services (tests pass their own, with fake plugins)."""
    settings = node.settings
    node.table.ensure()  # so the table's epoch, and every cursor handed out, stays put
    auth = RequestAuth(node.state, node.trust, settings.clock_window_seconds,
                       open_mode=settings.trust_mode == "open", node_id=node.identity.node_id)
    middleware: list[Any] = [BodySizeLimit(settings.max_body_bytes), auth,
                             NodeOnRequest(node.identity.node_id)]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    compact = falcon.media.JSONHandler(dumps=functools.partial(
        json.dumps, separators=(",", ":"), ensure_ascii=False))
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = compact
    errors.install(app)
    app.add_error_handler(Refusal, errors.handle_refusal)
    app.add_route("/v1/health", resources.HealthResource(node.started))
    app.add_route("/v1/node", resources.NodeResource(node.own.record))
    app.add_route("/v1/specs", resources.SpecsResource(node.own.specs_json))
    app.add_route("/v1/speedtest/download", resources.SpeedDownloadResource(
        settings.speedtest_default_bytes, settings.speedtest_max_bytes))
    app.add_route("/v1/speedtest/upload",
                  resources.SpeedUploadResource(settings.speedtest_max_bytes))
    app.add_route("/v1/images", resources.ImagesResource(lambda: node.hosting.backends,
                                                         settings.container_images))
    app.add_route("/v1/peers", resources.PeersResource(node.exchange.answer, node.exchange.etag,
                                                       auth.admits, ReachedAt(node.home).note))
    app.add_route("/v1/containers", resources.ContainersResource(node.hosting.service))
    app.add_route("/v1/containers/{container_id}",
                  resources.ContainerResource(node.hosting.service))
    # Exec streams, relay polls and dial-backs each hold a thread, each kind from a budget
    # of its own (gthread's threads are a fixed number per worker): relay traffic never
    # takes the threads of this host's own execs, nor polls the streams'. Two of 'threads'
    # are always left for the rest; a relay has threads of its own on top (see
    # worker_threads). Tunnels, as relayed streams, are carried by a loop: a budget of
    # descriptors, not threads.
    app.add_route("/v1/containers/{container_id}/tunnel", streams.TunnelResource(
        node.hosting.service, Held(streams.TUNNELS_PER_WORKER, "tunnels")))
    app.add_route("/v1/containers/{container_id}/exec", exec_stream.ExecResource(
        node.hosting.service, Held(settings.threads - 2, "exec streams")))
    hub = RelayHub(node.home, settings.relay_max_nodes, settings.relay_max_connections)
    polls = Held(settings.relay_poll_threads, "relay polls")
    # Joined streams and listening nodes are held by loops (relay.relay_loop,
    # relay_listen), not a thread each: their budgets bound descriptors and memory.
    waiting, legs = relay.budgets(settings)
    clients = Held(legs, "relayed streams")
    nodes = Held(legs, "relayed streams (the nodes' ends)")
    setups = Held(settings.relay_stream_threads, "relayed streams being set up")
    app.add_route("/v1/relay/wait", relay.RelayWaitResource(settings, hub,
                                                            node.trust.is_trusted, polls))
    app.add_route("/v1/relay/listen", relay.RelayListenResource(
        settings, hub, node.trust.is_trusted, Held(waiting, "waiting nodes")))
    app.add_route("/v1/relay/accept", relay.RelayAcceptResource(settings, hub, nodes))
    app.add_route("/v1/relay/connect", relay.RelayConnectResource(settings, hub, clients,
                                                                  setups))
    app.add_route("/v1/reach", streams.ReachCheckResource(
        node.peers.secure, Held(DIAL_BACKS, "dial-backs"), settings.allow_loopback))
    app.add_route("/v1/punch", PunchResource(node.home, settings.port,
                                             settings.allow_loopback, node.trust.is_trusted))
    app.add_route("/v1/trust/me",
                  resources.TrustMeResource(node.trust.is_trusted, settings.trust_mode))
    app.add_route("/v1/trust/join", resources.TrustJoinResource(node.invites.accept))
    app.add_route("/v1/openapi.json",
                  resources.OpenAPIResource(lambda: openapi.build_document(app)))
    node.hooks.add_routes(app)
    return app
