"""A comparison over several tasks: each task's tables, then the performance profile as a table and profile.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from optcli.report.format import fmt
from optcli.report.layout import Col, fitted_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from optcli.compare.multitask import MultiTaskComparison


def measures_table(multitask: MultiTaskComparison, *, width: int | None = None) -> Table:
    labels = list(dict.fromkeys(label for by_label in multitask.measures.values() for label in by_label))
    rows = []
    for label in labels:
        cells = []
        for task, by_label in multitask.measures.items():
            value, best = by_label.get(label, math.inf), min(by_label.values())
            why = multitask.unscored.get(task, {}).get(label, "not run")
            cells.append(f"[red]{why}[/]" if not math.isfinite(value) else f"{fmt(value)} (×{value / best:.4g})")
        rows.append([label, *cells])
    cols = [Col("optimizer"), *(Col(task, "text", priority=50) for task in multitask.measures)]
    title = f"Per-task measure: {multitask.measure} (ratio to the task's best)"
    return fitted_table(title, cols, rows, width=width)


def profile_table(multitask: MultiTaskComparison, *, width: int | None = None) -> Table:
    best = max(rho[0] for rho in multitask.profile.values())
    rows = [
        [label, *[(f"[bold green]{r:.2f}[/]" if i == 0 and r == best else f"{r:.2f}") for i, r in enumerate(rho)]]
        for label, rho in multitask.profile.items()
    ]
    # tau = 1 (who is best) and the largest tau (who ever gets close) are the last to be left out
    last = len(multitask.taus) - 1
    cols = [Col("optimizer")] + [
        Col(f"tau={fmt(tau, 3)}", "num", priority=90 if i == 0 else 85 if i == last else 80 - i)
        for i, tau in enumerate(multitask.taus)
    ]
    title = (
        f"Performance profile over {len(multitask.measures)} tasks: fraction of tasks within a factor tau of the best"
    )
    table = fitted_table(title, cols, rows, width=width)
    table.caption = f"measure: {multitask.measure_why}" + (f"; {table.caption}" if table.caption else "")
    return table


def print_multitask(multitask: MultiTaskComparison, console: Console) -> None:
    from optcli.report.tables import print_comparison

    for name, comparison in multitask.tasks:
        console.print(Rule(f"task {name}"))
        print_comparison(comparison)
    console.print(Rule("across tasks"))
    console.print(measures_table(multitask))
    console.print(profile_table(multitask))
    for warning in multitask.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"wall time {multitask.wall_seconds:.1f} s; files: {multitask.run_dir} "
        "(profile.png, summary.json, one folder per task)"
    )


def profile_figure(taus: list[float], rho: dict[str, list[float]], *, measure: str) -> Figure:
    """rho(tau) as a step function per optimizer, tau on a log axis from 1."""
    from optcli.report.plots import new_figure

    top = max(taus) * 1.5 if len(taus) > 1 else 2.0
    fig = new_figure((6.5, 4.5))
    ax = fig.subplots()
    for label, values in rho.items():
        ax.step([*taus, top], [*values, values[-1]], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlim(1.0, top)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau (ratio to the best on each task)")
    ax.set_ylabel("fraction of tasks within tau of the best")
    ax.set_title(f"Performance profile ({measure})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save_profile_plot(taus: list[float], rho: dict[str, list[float]], path: Path, *, measure: str) -> None:
    """profile.png of a comparison over several tasks."""
    from optcli.report.plots import save_figure

    save_figure(profile_figure(taus, rho, measure=measure), path)
