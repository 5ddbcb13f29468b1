"""p2prc: a small peer-to-peer network to run anything on a friend's machine.

This module holds all that a plugin needs to import: the ``hookimpl`` marker
and the version. pluggy is imported when ``hookimpl`` is first asked for: a command that
loads no plugin (``p2prc --help``) does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

PROJECT_NAME = "p2prc"

if TYPE_CHECKING:
    import pluggy

    hookimpl: pluggy.HookimplMarker
    """Marker for plugin hook implementations: ``@hookimpl def p2prc_score_peer(peer): ...``"""


def __getattr__(name: str) -> Any:
    if name == "hookimpl":
        import pluggy

        marker = pluggy.HookimplMarker(PROJECT_NAME)
        globals()["hookimpl"] = marker
        return marker
    raise AttributeError(f"module 'p2prc_core' has no attribute {name!r}")


__all__ = ["PROJECT_NAME", "__version__", "hookimpl"]
