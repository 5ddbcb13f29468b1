"""Reading request bodies within their size caps."""

from __future__ import annotations

from typing import Any

import falcon

from p2prc_core.models import loads_strict
from p2prc_core.text import human_bytes


def too_large(limit: int) -> falcon.HTTPContentTooLarge:
    return falcon.HTTPContentTooLarge(
        title="Request body too large",
        description=f"This server accepts at most {human_bytes(limit)} here.")


class BodySizeLimit:
    """Middleware: refuse a declared body over its cap before reading any of it.

    A resource may raise its own cap with a ``max_body_bytes`` attribute (the
    speed-test upload does). Bodies without a Content-Length are capped where
    they are read (``read_json``).
    """

    def __init__(self, default_limit: int):
        self.default_limit = default_limit

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: Any, params: dict[str, Any]) -> None:
        limit = getattr(resource, "max_body_bytes", None) or self.default_limit
        req.context.max_body_bytes = limit
        if req.content_length is not None and req.content_length > limit:
            raise too_large(limit)


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The request body, read up to ``limit`` + 1 bytes: by its Content-Length, or decoded
    from chunks (the WSGI server decodes them) when it has none. Never taken as empty when
    it is not."""
    if req.content_length is not None:
        body: bytes = req.bounded_stream.read(limit + 1)
        return body
    if "chunked" in (req.get_header("Transfer-Encoding") or "").lower():
        chunks, size = [], 0
        while size <= limit:
            block = req.stream.read(min(65536, limit + 1 - size))
            if not block:
                break
            chunks.append(block)
            size += len(block)
        return b"".join(chunks)
    return b""


def read_json(req: falcon.Request, limit: int | None = None) -> Any:
    """The request body parsed as JSON, read up to its cap.

    :raises falcon.HTTPContentTooLarge: the body is over the cap (413).
    :raises falcon.HTTPBadRequest: the body is empty or not JSON (400).
    """
    limit = limit or getattr(req.context, "max_body_bytes", None) or 1 << 20
    raw = getattr(req.context, "raw_body", None)  # already read for a signature check
    if raw is None:
        raw = read_body(req, limit)
    if len(raw) > limit:
        raise too_large(limit)
    if not raw:
        raise falcon.HTTPBadRequest(title="Empty body", description="Expected a JSON body.")
    try:
        return loads_strict(raw)
    except ValueError as err:
        raise falcon.HTTPBadRequest(title="Malformed JSON",
                                    description=f"The body is not valid JSON: {err}") from None
