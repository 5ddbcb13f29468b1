"""Render docs/hooks.md from the hook specifications, so the docs cannot drift from the code.

Run: python -m p2prc_core.hookdocs > docs/hooks.md
"""

from __future__ import annotations

import inspect

from p2prc_core import hookspecs

HEADER = """# Hooks

p2prc's core calls these hooks; plugins implement them. Every hook is prefixed `p2prc_`, and
the built-in implementations (in `p2prc_plugins`) are marked `trylast`, so a plugin of your
own runs first and can override them. See [writing-plugins.md](writing-plugins.md) for how
to package and register a plugin.

This page is generated from `p2prc_core/hookspecs.py` by `python -m p2prc_core.hookdocs`;
a test fails when the two differ.
"""


def hook_names() -> list[str]:
    return sorted(name for name in dir(hookspecs) if name.startswith("p2prc_"))


def render() -> str:
    parts = [HEADER]
    for name in hook_names():
        function = getattr(hookspecs, name)
        options = function.p2prc_spec
        signature = str(inspect.signature(function)).replace("'", "")
        parts.append(f"## `{name}{signature}`\n")
        if options.get("firstresult"):
            parts.append("*firstresult*: the first non-`None` answer wins.\n")
        parts.append(inspect.getdoc(function) or "")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
