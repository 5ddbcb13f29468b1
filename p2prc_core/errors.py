"""Errors that reach the user as one clear line, and the one mapping of transport failures
to them."""

from __future__ import annotations

import time

from p2prc_core.text import rough_duration, seconds_text

CLOCKS_APART = 60.0  # seconds: past this a refused signed request names the clocks


class P2PRCError(Exception):
    """Base of every error p2prc reports to a user; the message says what to do next."""


class Refusal(P2PRCError):
    """A request this node refuses. The server answers it with ``status`` and ``title``
    (one error handler maps every ``Refusal`` to HTTP); the CLI prints the message."""

    status = 400
    title = "Invalid request"

    def __init__(self, message: str, status: int | None = None, title: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title


class PeerError(P2PRCError):
    """A peer could not be reached, or did not answer as a p2prc node."""


class PeerRefused(PeerError):
    """A peer answered, and refused the request (an HTTP error with a JSON reason)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RelayRefused(PeerRefused):
    """A relay on the way refused to carry the request (not the peer's own answer)."""


def clocks_apart(status: int, date: str | None, now: float | None = None) -> str:
    """For a peer's 401 (a signed request refused): what to fix when this node's clock and
    the peer's are over ``CLOCKS_APART`` apart, measured here against the ``Date`` header of
    the answer; "" when they are not, or the header says nothing usable (it is the peer's
    say, only ever read as a time)."""
    if status != 401 or not date or len(date) > 64:
        return ""
    from email.utils import parsedate_to_datetime

    try:
        theirs = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return ""
    ahead = (time.time() if now is None else now) - theirs
    if abs(ahead) <= CLOCKS_APART:
        return ""
    side = "ahead of" if ahead > 0 else "behind"
    return (f"this node's clock is {rough_duration(ahead)} {side} the peer's (signed requests "
            f"allow about a minute): set the right time on the machine that is wrong ('p2prc "
            f"doctor' compares clocks). The peer said: ")


def unreachable(where: object, err: BaseException, timeout: float | None) -> PeerError:
    """The one mapping of a failure to reach or talk to a peer (httpx's errors and socket
    errors alike) to a one-line ``PeerError``."""
    timeouts: tuple[type[BaseException], ...] = (TimeoutError,)
    connects: tuple[type[BaseException], ...] = (OSError,)
    broken: tuple[type[BaseException], ...] = (ConnectionResetError, BrokenPipeError)
    if not isinstance(err, OSError | TimeoutError):  # a socket's own error needs no httpx
        from p2prc_core.httplib import httpcore, httpx

        timeouts += (httpx.TimeoutException, httpcore.TimeoutException)
        connects += (httpx.ConnectError, httpcore.ConnectError)
        broken += (httpx.RemoteProtocolError,)
    wait = seconds_text(timeout) if timeout is not None else "the time allowed"
    if isinstance(err, timeouts):
        return PeerError(f"{where} did not answer within {wait}")
    if isinstance(err, connects) and not isinstance(err, ConnectionResetError | BrokenPipeError):
        reason = (err.strerror if isinstance(err, OSError) else None) or \
            str(err).split("] ")[-1] or "connection failed"
        # Only a refused connection means nothing listens there; an unreachable network or
        # host is the path's fault, and the hint would mislead.
        hint = " (is 'p2prc server' running there?)" if "refused" in reason.lower() else ""
        return PeerError(f"cannot reach {where}: {reason}{hint}")
    if isinstance(err, broken):
        return PeerError(f"{where} broke the connection or is not an HTTP server: {err}")
    return PeerError(f"talking to {where} failed: {err}")


class UnknownPeer(P2PRCError):
    """PEER, as the user wrote it, names no peer and is no address (each front end maps it
    once: the CLI to a usage error, the dashboard to a note, ``import p2prc`` raises it)."""


class BadAddress(P2PRCError):
    """PEER text that is neither a known peer nor an address as p2prc writes one (the message
    says what is wrong); the CLI maps it once to a usage error."""
