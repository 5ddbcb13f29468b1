"""p2prc: a small peer-to-peer network to run anything on a friend's machine.

This module holds all that a plugin needs to import: the ``hookimpl`` marker
and the version.
"""

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "p2prc"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@hookimpl def p2prc_score_peer(peer): ...``"""

__all__ = ["PROJECT_NAME", "__version__", "hookimpl"]
