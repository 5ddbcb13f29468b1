"""Every error the server sends is JSON with a title and a description."""

from __future__ import annotations

import logging
from typing import Any

import falcon

from p2prc_core.disk import disk_full, full_message
from p2prc_core.server.upgrade import CLOSE_KEY

log = logging.getLogger("p2prc.server")

_DESCRIPTIONS = {
    404: "No such route. The routes this server has are listed at /v1/openapi.json.",
    405: "This route does not take that method. See /v1/openapi.json.",
    413: "The request is larger than this server accepts.",
    400: "The request is malformed.",
}


def serialize_error(req: falcon.Request, resp: falcon.Response,
                    exception: falcon.HTTPError) -> None:
    """Always JSON (whatever the client accepts), always with a description."""
    body: dict[str, Any] = dict(exception.to_dict())
    if not body.get("description"):
        body["description"] = _DESCRIPTIONS.get(exception.status_code, exception.title)
    resp.media = body
    resp.content_type = falcon.MEDIA_JSON
    resp.append_header("Vary", "Accept")



def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception,
                      params: dict[str, Any]) -> None:
    """A bug must not leak a traceback to a peer; it is logged here instead."""
    if isinstance(ex, falcon.HTTPError):
        raise ex
    if disk_full(ex):  # the host's to fix, in one line; the peer may come back later
        log.warning("%s %s answered 503: %s", req.method, req.path,
                    full_message(ex, "this node's home"))
        raise falcon.HTTPServiceUnavailable(
            title="Out of disk space",
            description="This host's disk is full now; try again later, or another host.",
            retry_after=60)
    log.exception("error while serving %s %s", req.method, req.path)
    raise falcon.HTTPInternalServerError(
        title="Internal error",
        description="The server failed to handle this request; its log has the details.")


def handle_refusal(req: falcon.Request, resp: falcon.Response, ex: Exception,
                   params: dict[str, Any]) -> None:
    """Every ``Refusal`` (a container request that cannot be met, a refused invite, a
    malformed exchange) is answered with its own status, title and message (its
    ``for_peers`` text where it has one: the host's fix is logged here instead)."""
    status = getattr(ex, "status", 500)
    for_peers = getattr(ex, "for_peers", None)
    if isinstance(for_peers, str) and for_peers:
        # The host's own fix goes to the host's log; the peer hears only what it can use.
        log.warning("%s %s answered %d: %s", req.method, req.path, status, ex)
    raise falcon.HTTPError(falcon.code_to_http_status(status), title=getattr(ex, "title", ""),
                           description=for_peers or str(ex))


def handle_too_slow(req: falcon.Request, resp: falcon.Response, ex: Exception,
                    params: dict[str, Any]) -> None:
    """A body that stalled, or did not arrive by the request's deadline (see
    ``server.front``): 408 and one line in the log, the connection closed."""
    log.info("%s %s: the body did not arrive in time (%s)", req.method, req.path,
             ex or "timed out")
    req.env[CLOSE_KEY] = True  # what is left of the body is not read: close after
    raise falcon.HTTPError(
        falcon.HTTP_408, title="Request too slow",
        description="The request's body did not arrive in time; send it again, faster.")


def install(app: falcon.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(TimeoutError, handle_too_slow)
    app.set_error_serializer(serialize_error)
