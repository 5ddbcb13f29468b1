"""Printing: readable tables for people, ``--json`` for programs."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# ANSI escape sequences (CSI, OSC and single-character ones), then every other control
# character: what a peer says must not move the cursor, recolour or retitle a terminal.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# Piped output is not folded at 80 columns: tables stay one row a line.
console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)


def clean(text: object, limit: int = 1000) -> str:
    """``text`` safe to show in a terminal: escape sequences and control characters (and
    bidirectional overrides) removed, at most ``limit`` characters."""
    shown = _CONTROL.sub(" ", _ESCAPES.sub("", str(text)))
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


WHOLE = {"node id", "id", "owner", "container", "host", "run"}  # columns never wrapped


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None) -> None:
    """Cells are shown as they are: never read as rich markup (``[fd42::1]:8088`` and a
    peer's ``[bold]`` alike), and cleaned of escape sequences and control characters."""
    table = Table(title=Text(clean(title)) if title else None, title_justify="left",
                  header_style="bold", box=None, pad_edge=False)
    cells = [[Text("" if cell is None else clean(cell)) for cell in row] for row in rows]
    for index, column in enumerate(columns):
        header = Text(clean(column))  # '[fd42::1]:8088' is an address, not markup
        if column in WHOLE:  # ids are copied and pasted: never wrapped or cut
            table.add_column(header, no_wrap=True, overflow="ignore", min_width=max(
                (len(row[index]) for row in cells if index < len(row)), default=0))
        else:
            table.add_column(header, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console.print(table)


def human_bytes(count: Any) -> str:
    """A size as people read it; anything that is not a number (a peer's say) is '?'."""
    if count is None:
        return "-"
    if isinstance(count, bool) or not isinstance(count, int | float) or count != count \
            or count in (float("inf"), float("-inf")):
        return "?"
    try:
        value = float(count)
    except OverflowError:  # a whole number past any float
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{_short(value)} {unit}"
        value /= 1024
    return f"{_short(value)} TiB"


def _short(value: float) -> str:
    """1 decimal, none when it is 0: 512 MiB, 1.5 GiB."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def human_duration(seconds: float) -> str:
    """A duration as people say it: 90 s, 45 min, 2 h, 30 days (the largest unit that
    gives at least 1)."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = seconds / size
            name = "day" if unit == "days" and _short(count) == "1" else unit
            return f"{_short(count)} {name}"
    return f"{_short(seconds)} s"


def format_ago(stamp: float | None, now: float | None = None) -> str:
    """How long ago ``stamp`` was: ``5m ago``, ``never``."""
    if not stamp:
        return "never"
    seconds = max(0, int((time.time() if now is None else now) - stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def two_places(value: Any) -> str:
    """A number (a peer's say) to two places; anything else, or past a float, is '?'."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    try:
        return f"{float(value):.2f}"
    except OverflowError:
        return "?"


def format_when(stamp: float | None) -> str:
    """A moment as people read it, in local time with its zone."""
    if not stamp:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(stamp))
    except (OverflowError, OSError, ValueError, TypeError):  # past what the clock can show
        return "?"


def did_you_mean(text: str, choices: list[str]) -> str:
    """``" (did you mean 'alice'?)"`` for the closest of ``choices``, or nothing."""
    import difflib

    near = difflib.get_close_matches(text, [c for c in choices if c], n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""
