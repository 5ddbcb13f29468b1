"""Errors that reach the user as one clear line."""


class P2PRCError(Exception):
    """Base of every error p2prc reports to a user; the message says what to do next."""


class PeerError(P2PRCError):
    """A peer could not be reached, or did not answer as a p2prc node."""
