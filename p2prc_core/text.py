"""Text for people, without a terminal library: what a peer says made safe to show, sizes,
durations and times as people read them. The server, the domain modules and every front end
use these; the Rich tables of the command line are in ``output``."""

from __future__ import annotations

import re
import time
from typing import Any

# ANSI escape sequences (CSI, OSC and single-character ones), then every other control
# character: what a peer says must not move the cursor, recolour or retitle a terminal.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

def clean(text: object, limit: int = 1000) -> str:
    """``text`` safe to show in a terminal: escape sequences and control characters (and
    bidirectional overrides) removed, at most ``limit`` characters."""
    shown = str(text)
    if not (shown.isascii() and shown.isprintable()):  # (printable ASCII: nothing to take out)
        shown = _CONTROL.sub(" ", _ESCAPES.sub("", shown))
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


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


def rough_duration(seconds: float) -> str:
    """How far apart two moments are, roughly, either way round (two clocks, say): ``1 h``
    (for 3,599 s too), ``5 min``, ``75 s``."""
    seconds = abs(seconds)
    return human_duration(round(seconds / 60) * 60 if seconds >= 90 else round(seconds))


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


def seconds_text(seconds: float) -> str:
    """A wait as an error line says it: ``5 s``, ``0.5 s`` (to a tenth, never 4.98379 s)."""
    return f"{round(seconds, 1):g} s"
