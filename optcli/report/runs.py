"""`optcli runs` on the terminal: the run directories, newest first."""

from __future__ import annotations

from rich.table import Table

from optcli.report.format import fmt


def runs_table(rows: list[dict]) -> Table:
    table = Table(title=f"{len(rows)} run(s), newest first")
    for header in ("name", "command", "task", "optimizers", "status", "best", "date"):
        table.add_column(header)
    for r in rows:
        best = f"{r['best']['metric']} {fmt(r['best']['value'])}" if r.get("best") else "—"
        status = r["status"] or "—"
        shown = status if status in ("completed", "stopped_early") else f"[yellow]{status}[/]"
        table.add_row(
            r["name"],
            r["command"] or "—",
            r["task"] or "—",
            ", ".join(str(o) for o in r["optimizers"]) or "—",
            shown,
            best,
            r["date"],
        )
    return table
