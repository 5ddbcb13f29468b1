"""The SSH key the client logs into containers with, made on first use."""

from __future__ import annotations

import os
from pathlib import Path

from p2prc_core.errors import P2PRCError
from p2prc_core.storage import atomic_write

KEY_NAME = "id_ed25519"


def key_paths(home: Path, configured: str = "") -> tuple[Path, Path]:
    private = Path(configured).expanduser() if configured else home / "ssh" / KEY_NAME
    return private, private.with_name(private.name + ".pub")


def ensure_key(home: Path, configured: str = "") -> tuple[Path, str]:
    """The private key's path and the public key line; made (Ed25519, 0600) if missing."""
    private, public = key_paths(home, configured)
    if not private.exists():
        if configured:
            raise P2PRCError(f"the configured ssh_key {private} does not exist")
        # Imported here: the wire's definitions import this module for login_command.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH)
        os.makedirs(private.parent, mode=0o700, exist_ok=True)
        atomic_write(public, line + b" p2prc\n", mode=0o644)
        atomic_write(private, pem, mode=0o600)
    if not public.exists():
        raise P2PRCError(f"{public} is missing: p2prc needs the public half of {private}")
    return private, public.read_text().strip()


def login_command(host: str, port: int, user: str = "root") -> str:
    """The plain ssh command line for a container (an IPv6 host goes without brackets)."""
    return f"ssh -p {port} {user}@{host.strip('[]')}"


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    """One known_hosts line pinning ``host_key`` at ``host``:``port``."""
    return f"[{host.strip('[]')}]:{port} {host_key}\n"
