"""The peer server: a Falcon app (``create_app``) served by embedded gunicorn (``serve``)."""

from p2prc_core.server.app import create_app

__all__ = ["create_app"]
