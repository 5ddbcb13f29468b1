"""A file of a run's or a job's outputs, served as the dashboard serves them: only from
inside its folder, as plain text."""

from __future__ import annotations

from pathlib import Path

import falcon

MAX_SHOWN = 4 << 20  # bytes of a file served


def send_inside(resp: falcon.Response, root: Path | None, name: str, missing: str) -> None:
    """Serve ``root/name`` as text, where it is a file inside ``root`` once resolved (no
    ``..``, no link out); else 404 with ``missing``."""
    path = (root / name).resolve() if root is not None else None
    if root is None or path is None or not path.is_relative_to(root) or not path.is_file():
        raise falcon.HTTPNotFound(description=missing)
    resp.content_type = "text/plain; charset=utf-8"  # never rendered as a page
    resp.set_header("Content-Disposition", "inline")
    with path.open("rb") as f:
        resp.data = f.read(MAX_SHOWN)
