"""``/v1/openapi.json``, built from the routes the app really has; its schemas are generated
from the wire messages' own definitions (``p2prc_core.wire``), so the document, the client and
the server cannot disagree."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import falcon
from falcon import constants

from p2prc_core import __version__
from p2prc_core.wire import schema_components

_SKIPPED = {"OPTIONS"}  # answered by falcon for every route


def routes(app: falcon.App) -> Iterator[tuple[str, str, Any]]:
    """(uri template, lower-case method, resource) for every responder the app has."""
    stack = list(app._router._roots)  # type: ignore[attr-defined]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.resource is None:
            continue
        for method in constants.COMBINED_METHODS:
            if method in _SKIPPED:
                continue
            if callable(getattr(node.resource, "on_" + method.lower(), None)):
                yield str(node.uri_template), method.lower(), node.resource


def build_document(app: falcon.App) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for template, method, resource in sorted(routes(app), key=lambda r: (r[0], r[1])):
        declared = dict(getattr(resource, "OPENAPI", {}).get(method, {}))
        if "summary" not in declared:
            doc = inspect.getdoc(getattr(resource, "on_" + method)) or ""
            declared["summary"] = doc.splitlines()[0] if doc else template
        responses = dict(declared.get("responses", {"200": {"description": "OK"}}))
        for status, description in _answers(getattr(resource, "AUTH", {}).get(method), method):
            responses.setdefault(status, {"description": description})
        declared["responses"] = responses
        declared["operationId"] = f"{method}_{template.strip('/').replace('/', '_') or 'root'}"
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_params(template)]
        if params:
            declared["parameters"] = params + list(declared.get("parameters", []))
        paths.setdefault(template, {})[method] = declared
    schemas = {"Error": {
        "type": "object", "required": ["title", "description"],
        "properties": {"title": {"type": "string"}, "description": {"type": "string"}}},
        **schema_components()}
    return {
        "openapi": "3.1.0",  # msgspec writes JSON Schema 2020-12, which 3.1 uses
        "info": {"title": "p2prc peer API", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _answers(need: str | None, method: str) -> list[tuple[str, str]]:
    """The errors every such route can give, whatever its resource declares."""
    found = []
    if need is not None and need != "if-signed":  # an open route signed by choice: no 401
        found.append(("401", "not validly signed: missing, malformed, expired, replayed, or "
                             "signed for another node"))
    if need == "trusted":
        found.append(("403", "validly signed by a node this host does not trust"))
    if method in ("post", "put", "patch") or need is not None:
        found += [("400", "malformed input (the description says what)"),
                  ("413", "a body over this server's cap")]
    return found


def _path_params(template: str) -> list[str]:
    names = []
    for segment in template.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            names.append(segment[1:-1].split(":", 1)[0])
    return names
