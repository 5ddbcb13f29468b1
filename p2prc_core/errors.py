"""Errors that reach the user as one clear line."""


class P2PRCError(Exception):
    """Base of every error p2prc reports to a user; the message says what to do next."""


class PeerError(P2PRCError):
    """A peer could not be reached, or did not answer as a p2prc node."""


class PeerRefused(PeerError):
    """A peer answered, and refused the request (an HTTP error with a JSON reason)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
