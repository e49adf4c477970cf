"""Tables that stay readable at any terminal width: names and numbers never break mid-word.

A column is a name, a number or free text. Names and numbers keep their natural width on one line; free text
(hyperparameters, descriptions) wraps at spaces and never gets narrower than its longest word. When even that
does not fit, the columns of lowest priority are left out, and the caption says which (--json has them all)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from optcli.report.console import console

BORDER = 3  # a column's two padding cells and its separator in Rich's default box


@dataclass
class Col:
    header: str
    kind: str = "name"  # name | num | text
    priority: int = 100  # columns of lowest priority are left out first when the table is too wide


def _cell_len(text: str) -> int:
    return Text.from_markup(text).cell_len


def _widths(col: Col, cells: list[str]) -> tuple[int, int]:
    """(narrowest, natural): a free-text column may narrow down to its longest word, other columns not at all."""
    natural = max(_cell_len(text) for text in [col.header, *cells])
    if col.kind != "text":
        return natural, natural
    words = [w for text in [col.header, *cells] for w in Text.from_markup(text).plain.split()]
    return max((len(w) for w in words), default=1), natural


def fitted_table(title: str, cols: list[Col], rows: list[list[str]], *, width: int | None = None) -> Table:
    """A Rich table of `rows` under `cols` that fits `width` (the console's by default)."""
    width = width or console.width
    bounds = [_widths(c, [r[i] for r in rows]) for i, c in enumerate(cols)]
    keep = list(range(len(cols)))
    while sum(bounds[i][0] + BORDER for i in keep) + 1 > width and len(keep) > 1:
        keep.remove(min(keep, key=lambda i: (cols[i].priority, -i)))
    # free-text columns start at their narrowest and share what is left, up to their natural width
    text = [i for i in keep if cols[i].kind == "text"]
    spare = width - 1 - sum(bounds[i][0] + BORDER for i in keep)
    want = sum(bounds[i][1] - bounds[i][0] for i in text)
    table = Table(title=title)
    for i in keep:
        c, (narrow, natural) = cols[i], bounds[i]
        if c.kind == "text":
            extra = (natural - narrow) if want <= spare else (natural - narrow) * spare // want
            table.add_column(c.header, overflow="fold", width=narrow + extra)
        else:
            table.add_column(c.header, justify="right" if c.kind == "num" else "left", no_wrap=True)
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    hidden = [cols[i].header for i in range(len(cols)) if i not in keep]
    if hidden:
        table.caption = f"left out at {width} columns: {', '.join(hidden)} (a wider terminal or --json shows them)"
    return table
