"""Offers between a server's workers: the worker that took ``POST /v1/punch`` hands the offer
to the worker that owns the UDP socket (``udp_endpoint.UdpOwner``), and hears whether it was
taken.

Over an abstract Unix stream socket named after the home. Each end checks the other's
credentials (``SO_PEERCRED``): the owner takes offers only from a process of its own user,
and a worker hands an offer only to a process of its own user, so another local user can
neither inject an offer nor, by taking the name first, read one. One line of JSON each way:

    {"token": HEX, "candidates": [[HOST, PORT], ...], "trusted": BOOL}  ->  "ok" | "full"
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2prc_core import punch

MAX_MESSAGE = 4096  # the longest offer line
ANSWER_SECONDS = 1.0  # how long a worker waits for the owner's word
_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


def control_name(home: Path) -> str:
    """The abstract Unix socket the owner takes offers on (one per home)."""
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:24]
    return "\0p2prc-udp-" + digest


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of ``sock`` runs as this process's user."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    _, uid, _ = _CREDENTIALS.unpack(raw)
    return bool(uid == os.getuid())


def send_offer(home: Path, token: bytes, candidates: list[tuple[str, int]],
               trusted: bool) -> str | None:
    """Hand an offer to the owner of the UDP socket: its word ("ok", or "full": too many
    offers live), or None where no owner of this user listens."""
    line = json.dumps({"token": token.hex(), "candidates": [list(c) for c in candidates],
                       "trusted": trusted}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_SECONDS)
        try:
            sock.connect(control_name(home))
            if not same_user(sock):
                return None  # someone else took the name: it gets nothing
            sock.sendall(line)
            answer = sock.recv(16).strip().decode("ascii", "replace")
        except OSError:
            return None
    return answer if answer in ("ok", "full") else None


Offer = tuple[bytes, list[tuple[str, int]], bool]  # token, candidates, trusted


def read_offer(line: bytes, allow_loopback: bool) -> Offer | None:
    """The offer in ``line``, checked again (it crossed a process boundary), or None."""
    try:
        message = json.loads(line)
        token = punch.token_from_hex(message["token"])
        candidates = punch.parse_candidates(
            [punch.candidate_text(str(h), int(p)) for h, p in message["candidates"]],
            allow_loopback)
        trusted = message["trusted"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return (token, candidates, trusted) if isinstance(trusted, bool) else None


async def serve(home: Path, take: Callable[[Offer], bool], allow_loopback: bool) -> Any:
    """Take offers for ``take`` (True: taken) until the loop ends; the server, or None
    where the name is taken (punching is then off)."""
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not same_user(writer.get_extra_info("socket")):
                return
            line = await asyncio.wait_for(reader.readline(), ANSWER_SECONDS)
            offer = read_offer(line[:MAX_MESSAGE], allow_loopback)
            if offer is not None:
                writer.write(b"ok\n" if take(offer) else b"full\n")
                await writer.drain()
        except (OSError, ValueError, TimeoutError):
            pass
        finally:
            writer.close()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(control_name(home))
    except OSError:
        sock.close()
        return None
    return await asyncio.start_unix_server(one, sock=sock, limit=MAX_MESSAGE)
