"""Printing for the command line: readable tables for people, ``--json`` for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from p2prc_core.text import clean

if TYPE_CHECKING:
    from rich.console import Console

def get_console(stderr: bool = False) -> Console:
    """The console of stdout (or stderr), made at first use: rich takes 20 ms to load, which
    ``--json`` does not need. Kept as this module's ``console`` (``err_console``), which a
    test may set."""
    name = "err_console" if stderr else "console"
    found: Console | None = globals().get(name)
    if found is None:
        from rich.console import Console

        # Piped output is not folded at 80 columns: tables stay one row a line.
        found = Console(stderr=True, highlight=False) if stderr else \
            Console(highlight=False, soft_wrap=False,
                    width=None if sys.stdout.isatty() else 200)
        globals()[name] = found
    return found


def __getattr__(name: str) -> Console:
    if name in ("console", "err_console"):
        return get_console(stderr=name == "err_console")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def print_json(data: Any) -> None:
    """``data`` as indented JSON; a long list (``LONG_TABLE`` items or more) an item a line,
    each compact: the same JSON, written by the C encoder (indenting takes the pure-Python
    one: half a second for a table of 10,000 peers)."""
    if isinstance(data, list) and len(data) >= LONG_TABLE:
        encode = json.JSONEncoder(default=str, separators=(", ", ": ")).encode
        sys.stdout.write("[\n" + ",\n".join("  " + encode(item) for item in data) + "\n]\n")
        return
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


WHOLE = {"node id", "id", "owner", "container", "host", "run"}  # columns never wrapped


_CLEAN_LIMIT = 1000  # characters of a cell clean() keeps
LONG_TABLE = 500  # rows from which a table is written as plain columns (rich takes ~1 ms a row)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None) -> None:
    """Cells are shown as they are: never read as rich markup (``[fd42::1]:8088`` and a
    peer's ``[bold]`` alike), and cleaned of escape sequences and control characters."""
    if len(rows) >= LONG_TABLE:
        _print_long(columns, rows, title)
        return
    from rich.table import Table
    from rich.text import Text

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
    get_console().print(table)


def _print_long(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None) -> None:
    """The same columns as ``print_table`` draws (two spaces apart, each as wide as its
    widest cell), written directly: a table of 10,000 peers in tens of milliseconds. Cells
    are not folded to the terminal's width."""
    from rich.cells import cell_len

    def padded(cells: list[str]) -> list[str]:
        """A column's cells, each as wide on the screen as the widest."""
        joined = "".join(cells)
        if not (joined.isascii() and joined.isprintable()) or \
                max(map(len, cells), default=0) > _CLEAN_LIMIT:
            cells = [clean(c) for c in cells]  # (printable ASCII: nothing to take out)
            joined = "".join(cells)
        if joined.isascii():  # one screen column a character
            wide = max(map(len, cells), default=0)
            return [c.ljust(wide) for c in cells]
        wide = max(map(cell_len, cells), default=0)
        return [c + " " * (wide - cell_len(c)) for c in cells]

    head = [clean(c) for c in columns]
    texts = [["" if cell is None else cell if type(cell) is str else str(cell)
              for cell in column] for column in zip_longest(*rows, fillvalue="")]
    texts = (texts + [[""] * len(rows)] * len(head))[:len(head)]  # a column each heading
    shown = [padded([h, *column]) for h, column in zip(head, texts, strict=True)]
    lines = ["  ".join(row) for row in zip(*shown, strict=True)] if shown else \
        [""] * (len(rows) + 1)
    if any(len(row) < len(head) for row in rows):  # a short row: only the cells it has
        lines[1:] = ["  ".join(cells[:len(row)]) for row, cells in
                     zip(rows, list(zip(*shown, strict=True))[1:], strict=True)]
    from rich.text import Text

    console = get_console()
    if title:
        console.print(Text(clean(title)))
    console.print(Text(lines[0], style="bold"))
    console.file.write("".join(line + "\n" for line in lines[1:]))
    console.file.flush()
