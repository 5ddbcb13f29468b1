"""``p2prc ui``: a local web dashboard for this node (server-rendered, no build step)."""

from p2prc_ui.app import Dashboard, Served, create_app, serve

__all__ = ["Dashboard", "Served", "create_app", "serve"]
