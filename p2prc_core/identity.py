"""This node's Ed25519 key, its node id, and signing and verifying what nodes say."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2prc_core.errors import P2PRCError

KEY_FILE = "node.key"
NODE_ID_LENGTH = 26  # base32 characters: 130 bits of the key's SHA-256


class IdentityError(P2PRCError):
    """The node key cannot be read or created."""


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode unpadded base64url, in its one canonical spelling.

    :raises ValueError: not base64url, or spelt another way (spare bits set, padding): each
        value has exactly one accepted text, so a signature cannot be re-spelt.
    """
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not base64url text")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as err:
        raise ValueError(f"not base64url text: {err}") from None
    if b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


def canonical_json(data: Any) -> bytes:
    """The one byte form of ``data`` that is signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def node_id_for(public_key: bytes) -> str:
    """A node id: short enough to read out, derived from (and so bound to) the public key."""
    digest = hashlib.sha256(b"p2prc-node-id\0" + public_key).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:NODE_ID_LENGTH]


def is_node_id(text: str) -> bool:
    return (isinstance(text, str) and len(text) == NODE_ID_LENGTH
            and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in text))


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# The DER of an unencrypted PKCS #8 Ed25519 key is these 16 bytes, then the 32-byte seed.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")


def _pem(key: Ed25519PrivateKey) -> bytes:
    """``key`` as PEM, PKCS #8, unencrypted (the form OpenSSL and cryptography write)."""
    body = base64.encodebytes(_PKCS8_ED25519 + key.private_bytes_raw()).replace(b"\n", b"")
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n"


def _read_pem(pem: bytes) -> object:
    """The key in ``pem``. The node key as ``_pem`` writes it is read here directly; any
    other form goes to cryptography's reader, whose import costs a tunnel helper (which
    reads this key on every start) more than the rest of its work."""
    lines = pem.strip().splitlines()
    if len(lines) >= 3 and lines[0] == b"-----BEGIN PRIVATE KEY-----" \
            and lines[-1] == b"-----END PRIVATE KEY-----":
        try:
            der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
        except ValueError:
            der = b""
        if len(der) == 48 and der.startswith(_PKCS8_ED25519):
            return Ed25519PrivateKey.from_private_bytes(der[16:])
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(pem, password=None)


@dataclass(frozen=True)
class NodeIdentity:
    """A node's key pair. ``load_or_create`` keeps it in the home, mode 0600."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, home: Path) -> NodeIdentity:
        """The key in ``home``; created on first use. Two processes racing get the same key."""
        path = home / KEY_FILE
        if not path.exists():
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            pem = _pem(cls.generate().private_key)
            tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process got there first: use theirs
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        try:
            key = _read_pem(path.read_bytes())
        except (OSError, ValueError, TypeError) as err:
            raise IdentityError(f"cannot read the node key {path}: {err}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} is not an Ed25519 key")
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        return cls(key)
