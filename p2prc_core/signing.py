"""Signed requests: the caller's key signs the node the request is for, the method, path,
query, time, a nonce and the body. Naming the target means a request captured on its way to
one host cannot be replayed to another that trusts the same caller.

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
from p2prc_core.text import rough_duration

NODE = "X-P2PRC-Node"
KEY = "X-P2PRC-Key"
TIME = "X-P2PRC-Time"
NONCE = "X-P2PRC-Nonce"
SIGNATURE = "X-P2PRC-Signature"
TARGET = "X-P2PRC-Target"
HEADERS = (NODE, KEY, TIME, NONCE, SIGNATURE, TARGET)


def request_message(target: str, method: str, path: str, query: str, timestamp: str,
                    nonce: str, body: bytes) -> bytes:
    return "\n".join(["p2prc-request-v2", target, method.upper(), path, query, timestamp,
                      nonce, hashlib.sha256(body).hexdigest()]).encode("utf-8")


def sign_request(identity: NodeIdentity, method: str, path: str, query: str, body: bytes,
                 target: str, now: float | None = None) -> dict[str, str]:
    """The headers that make this request signed by ``identity``, for node ``target`` only."""
    timestamp = str(int(now if now is not None else time.time()))
    nonce = b64encode(os.urandom(18))
    signature = identity.sign(request_message(target, method, path, query, timestamp, nonce,
                                              body))
    return {NODE: identity.node_id, KEY: b64encode(identity.public_key), TIME: timestamp,
            NONCE: nonce, SIGNATURE: b64encode(signature), TARGET: target}


def outside_window(ahead: float, window: float) -> str:
    """Why a request dated ``ahead`` seconds after this server's clock is refused, in words
    that name the clocks (a caller's clock, or this one, was set wrong or jumped)."""
    side = "ahead of" if ahead > 0 else "behind"
    return (f"The request is dated {rough_duration(ahead)} {side} this server's clock (signed "
            f"requests allow {window:g} s): check the clocks of both machines.")


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
                    body: bytes, window: float, own_node_id: str,
                    now: float | None = None) -> SignedBy:
    """Verify the signature headers of a request made to node ``own_node_id``.

    :param header: looks up a request header by name (``None`` when absent).
    :raises SignatureError: missing, malformed, wrong key, signed for another node, bad
        signature, outside the window.
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
        if abs(timestamp) >= 1 << 53:  # no clock says this, and a float cannot hold it
            raise ValueError(time_text)
    except ValueError:
        raise SignatureError("Malformed signature",
                             "The signature headers cannot be decoded.") from None
    if not is_node_id(node_id) or len(nonce) > 64 or len(nonce) < 16:
        raise SignatureError("Malformed signature", "The node id or nonce is malformed.")
    if len(public_key) != 32 or node_id_for(public_key) != node_id:
        raise SignatureError("Wrong key", f"The key sent does not belong to node {node_id}.")
    if values[TARGET] != own_node_id:
        raise SignatureError("Signed for another node",
                             f"This request was signed for node {values[TARGET]!r}, not for "
                             f"this node ({own_node_id}): a request is good only at the node "
                             f"it was signed for.")
    now = now if now is not None else time.time()
    if abs(timestamp - now) > window:
        raise SignatureError("Signature expired", outside_window(timestamp - now, window))
    if not verify(public_key, signature, request_message(own_node_id, method, path, query,
                                                         time_text, nonce, body)):
        raise SignatureError("Invalid signature",
                             "The signature does not match this request: it was changed on "
                             "the way, or signed with another key.")
    return SignedBy(node_id, nonce, timestamp)
