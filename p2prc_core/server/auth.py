"""Signed requests and the allowlist, checked before any resource that changes state.

A resource says what each method needs with an ``AUTH`` mapping, for example
``AUTH = {"post": "trusted"}``:

- ``"signed"``: a valid signature from any node (redeeming an invite, asking who you are);
- ``"trusted"``: a valid signature from a node on this host's allowlist (or open mode);
- ``"if-signed"``: anyone; a caller that signs validly is named (``req.context.caller``),
  one that does not is not refused (``caller`` is None): the table exchange, whose answer
  says whether this host would start a container for the caller (``RequestAuth.admits``).

Answers: 401 when the signature is missing, invalid, expired or replayed; 403 when a
validly signed caller is not trusted.
"""

from __future__ import annotations

from typing import Any

import falcon

from p2prc_core.server.bodies import read_body, too_large
from p2prc_core.signing import NODE, SignatureError, check_signature
from p2prc_core.trust import ServerState, TrustStore

CHALLENGE = ["P2PRC-Signature"]


class RequestAuth:
    def __init__(self, state: ServerState, trust: TrustStore, window: float, open_mode: bool,
                 node_id: str):
        self.node_id = node_id  # a signature must name this node
        self.state = state
        self.trust = trust
        self.window = window
        self.open_mode = open_mode

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        need = getattr(resource, "AUTH", {}).get(req.method.lower())
        if need is None:
            return
        body = self._read_body(req)
        if need == "if-signed":
            req.context.caller = self._caller_if_signed(req, body)
            return
        try:
            signed = check_signature(req.get_header, req.method, req.env.get("PATH_INFO", "/"),
                                     req.query_string, body, self.window, self.node_id)
        except SignatureError as err:
            raise falcon.HTTPUnauthorized(title=err.title, description=str(err),
                                          challenges=CHALLENGE) from None
        if not self.state.use_nonce(signed.node_id, signed.nonce, 2 * self.window + 1):
            raise falcon.HTTPUnauthorized(
                title="Replayed request",
                description="This request was already received once (its nonce was used); "
                            "send a new request.", challenges=CHALLENGE)
        req.context.caller = signed.node_id
        if need == "trusted" and not self.admits(signed.node_id):
            raise falcon.HTTPForbidden(
                title="Not trusted",
                description=f"Node {signed.node_id} is not trusted by this host. Ask its "
                            f"owner to run 'p2prc trust {signed.node_id}', or for an invite "
                            f"to redeem with 'p2prc join TOKEN'.")

    def admits(self, node_id: str) -> bool:
        """Whether this host runs work for ``node_id`` (open mode, or on the allowlist): the
        one rule a "trusted" route answers 403 by, and an exchange's ``hosts_you``."""
        return self.open_mode or self.trust.is_trusted(node_id)

    def _caller_if_signed(self, req: falcon.Request, body: bytes) -> str | None:
        """The node that signed this request, or None: unsigned, or signed badly (a clock
        off, a replay), which an open route does not refuse."""
        if not req.get_header(NODE):
            return None
        try:
            signed = check_signature(req.get_header, req.method, req.env.get("PATH_INFO", "/"),
                                     req.query_string, body, self.window, self.node_id)
        except SignatureError:
            return None
        return signed.node_id if self.state.use_nonce(signed.node_id, signed.nonce,
                                                      2 * self.window + 1) else None

    @staticmethod
    def _read_body(req: falcon.Request) -> bytes:
        """Read the body once, within its cap, so the signature can cover it."""
        limit: int = getattr(req.context, "max_body_bytes", 1 << 20)
        body = read_body(req, limit)
        if len(body) > limit:
            raise too_large(limit)
        req.context.raw_body = body
        return body
