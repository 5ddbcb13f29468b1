"""httpx and httpcore, imported without what they load and p2prc never uses: trio (httpcore
imports it whenever it is installed, to choose its async locks; another package's test tools
bring it) and httpx's own command line (``httpx._main``, which imports click, rich and
pygments wherever they are installed, as they are beside p2prc). Together about 150 ms at
every start. Both are hidden only while these import, and stay importable after."""

from __future__ import annotations

import sys

_HIDDEN = [name for name in ("trio", "httpx._main") if name not in sys.modules]
for _name in _HIDDEN:
    sys.modules[_name] = None  # type: ignore[assignment]  # "import X" raises ImportError
try:
    import httpcore
    import httpx
finally:
    for _name in _HIDDEN:
        sys.modules.pop(_name, None)

__all__ = ["httpcore", "httpx"]
