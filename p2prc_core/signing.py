"""Signed requests: the caller's key signs the method, path, query, time, a nonce and the body.

The client signs by itself (``sign_request``); the server checks with ``check_signature``
and then that the nonce is new (``trust.ServerState.use_nonce``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from p2prc_core.identity import NodeIdentity, b64decode, b64encode, is_node_id, node_id_for, verify

NODE = "X-P2PRC-Node"
KEY = "X-P2PRC-Key"
TIME = "X-P2PRC-Time"
NONCE = "X-P2PRC-Nonce"
SIGNATURE = "X-P2PRC-Signature"
HEADERS = (NODE, KEY, TIME, NONCE, SIGNATURE)


def request_message(method: str, path: str, query: str, timestamp: str, nonce: str,
                    body: bytes) -> bytes:
    return "\n".join(["p2prc-request-v1", method.upper(), path, query, timestamp, nonce,
                      hashlib.sha256(body).hexdigest()]).encode("utf-8")


def sign_request(identity: NodeIdentity, method: str, path: str, query: str, body: bytes,
                 now: float | None = None) -> dict[str, str]:
    """The headers that make this request signed by ``identity``."""
    timestamp = str(int(now if now is not None else time.time()))
    nonce = b64encode(os.urandom(18))
    signature = identity.sign(request_message(method, path, query, timestamp, nonce, body))
    return {NODE: identity.node_id, KEY: b64encode(identity.public_key), TIME: timestamp,
            NONCE: nonce, SIGNATURE: b64encode(signature)}


class SignatureError(Exception):
    """The request is not validly signed (HTTP 401); the message says why and what to do."""

    def __init__(self, title: str, message: str):
        super().__init__(message)
        self.title = title


@dataclass(frozen=True)
class SignedBy:
    node_id: str
    nonce: str
    timestamp: int


def check_signature(header: Callable[[str], str | None], method: str, path: str, query: str,
                    body: bytes, window: float, now: float | None = None) -> SignedBy:
    """Verify the signature headers of a request.

    :param header: looks up a request header by name (``None`` when absent).
    :raises SignatureError: missing, malformed, wrong key, bad signature, outside the window.
    """
    values = {name: header(name) for name in HEADERS}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise SignatureError("Signature required",
                             f"This request must be signed (missing {', '.join(missing)}). "
                             f"The p2prc client signs requests by itself.")
    node_id, key_text = values[NODE] or "", values[KEY] or ""
    time_text, nonce = values[TIME] or "", values[NONCE] or ""
    try:
        public_key = b64decode(key_text)
        signature = b64decode(values[SIGNATURE] or "")
        timestamp = int(time_text)
    except ValueError:
        raise SignatureError("Malformed signature",
                             "The signature headers cannot be decoded.") from None
    if not is_node_id(node_id) or len(nonce) > 64 or len(nonce) < 16:
        raise SignatureError("Malformed signature", "The node id or nonce is malformed.")
    if len(public_key) != 32 or node_id_for(public_key) != node_id:
        raise SignatureError("Wrong key", f"The key sent does not belong to node {node_id}.")
    now = now if now is not None else time.time()
    if abs(now - timestamp) > window:
        raise SignatureError("Signature expired",
                             f"The request was signed {now - timestamp:+.0f} s from this "
                             f"server's clock, outside the {window:g} s window: check the "
                             f"clocks of both machines.")
    if not verify(public_key, signature,
                  request_message(method, path, query, time_text, nonce, body)):
        raise SignatureError("Invalid signature",
                             "The signature does not match this request: it was changed on "
                             "the way, or signed with another key.")
    return SignedBy(node_id, nonce, timestamp)
