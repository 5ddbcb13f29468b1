"""httpx and httpcore, imported without trio. httpcore imports trio whenever it is installed
(another package's test tools bring it) to choose its async locks, about 100 ms at every
start; p2prc never runs under trio. trio is hidden only while they import, and stays
importable after."""

from __future__ import annotations

import sys

_hidden = "trio" not in sys.modules
if _hidden:
    sys.modules["trio"] = None  # type: ignore[assignment]  # "import trio" raises ImportError
try:
    import httpcore
    import httpx
finally:
    if _hidden:
        sys.modules.pop("trio", None)

__all__ = ["httpcore", "httpx"]
