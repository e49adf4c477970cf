"""The tuning of a comparison on the terminal (the search spaces, every trial, the winners) and in tuning.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from optcli.report.format import fmt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SHORT = {"one_minus_momentum": "1-momentum", "weight_decay": "wd"}


def _short(name: str) -> str:
    return SHORT.get(name, name.replace("one_minus_beta", "1-beta"))


def space_table(tuning: dict) -> Table:
    table = Table(
        title=f"Search spaces: {tuning['budget']} trials per optimizer on seed {tuning['seed']}, "
        f"{tuning['sampler']}, chosen by {tuning['selected_by']}"
    )
    table.add_column("optimizer")
    table.add_column("search space (log-uniform)")
    for label, t in tuning["optimizers"].items():
        dims = ", ".join(f"{_short(d['name'])} [{fmt(d['low'], 2)}, {fmt(d['high'], 2)}]" for d in t["space"])
        table.add_row(label, dims)
    return table


def trials_table(tuning: dict) -> Table:
    table = Table(title="Tuning trials (validation loss; the winner in bold)")
    table.add_column("optimizer")
    table.add_column("trial", justify="right")
    table.add_column("setting")
    table.add_column("val loss", justify="right")
    for label, t in tuning["optimizers"].items():
        best = t["best"]["number"] if t["best"] else None
        for r in t["trials"]:
            setting = ", ".join(f"{_short(k)}={fmt(v, 3)}" for k, v in r["params"].items())
            loss = fmt(r["val_loss"]) if r["val_loss"] is not None else f"[red]{r['status']}[/]"
            if r["number"] == best:
                setting, loss = f"[bold green]{setting}[/]", f"[bold green]{loss}[/]"
            table.add_row(label, str(r["number"]), setting, loss)
    return table


def winners_table(tuning: dict) -> Table:
    table = Table(title="Tuned settings (run over every seed)")
    table.add_column("optimizer")
    table.add_column("winner")
    table.add_column("val loss", justify="right")
    table.add_column("edge of the space")
    for label, t in tuning["optimizers"].items():
        if t["best"] is None:
            table.add_row(label, f"[red]{t.get('note', 'no winner')}[/]", "—", "")
            continue
        setting = ", ".join(f"{_short(k)}={fmt(v, 3)}" for k, v in t["best"]["params"].items())
        edge = ", ".join(f"{_short(e['name'])} ({e['side']})" for e in t["at_edge"])
        table.add_row(label, setting, fmt(t["best"]["val_loss"]), f"[yellow]{edge}[/]" if edge else "no")
    if any(t["at_edge"] for t in tuning["optimizers"].values()):
        table.caption = (
            "a winner near the end of a range may have its optimum beyond it: widen that range "
            "(tuning.spaces in the config) or move the lr centre (an lr in the spec)"
        )
    return table


def print_tuning(tuning: dict, console: Console) -> None:
    console.print(space_table(tuning))
    console.print(trials_table(tuning))
    console.print(winners_table(tuning))


def tuning_figure(tuning: dict) -> Figure:
    """Per optimizer (a row), the validation loss of every trial against each hyperparameter (log axes; failed
    trials as red crosses on the top edge), and the best-so-far against trials spent."""
    from optcli.report.plots import new_figure

    rows = list(tuning["optimizers"].items())
    cols = 1 + max(len(tuned["space"]) for _, tuned in rows)
    fig = new_figure((3.2 * cols, 2.8 * len(rows)))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for ax_row, (label, tuned) in zip(axes, rows, strict=True):
        for ax, dim in zip(ax_row, tuned["space"], strict=False):
            _draw_trials(ax, tuned, dim, label)
        for ax in ax_row[len(tuned["space"]) : cols - 1]:
            ax.axis("off")
        _draw_best_so_far(ax_row[-1], tuned["trials"])
    fig.suptitle(f"Tuning: {tuning['budget']} quasi-random trials per optimizer, validation loss")
    fig.tight_layout()
    return fig


def _draw_trials(ax: Axes, tuned: dict, dim: dict, label: str) -> None:
    """The validation loss of every trial of one optimizer against one hyperparameter; the winner as a star."""
    done = [r for r in tuned["trials"] if r["val_loss"] is not None]
    failed = [r for r in tuned["trials"] if r["val_loss"] is None]
    top = max((r["val_loss"] for r in done), default=1.0)
    name = dim["name"]
    ax.scatter([r["params"][name] for r in done], [r["val_loss"] for r in done], s=18)
    if failed:
        ax.scatter([r["params"][name] for r in failed], [top] * len(failed), marker="x", c="red", s=24)
    if tuned["best"]:
        ax.scatter([tuned["best"]["params"][name]], [tuned["best"]["val_loss"]], marker="*", c="gold", s=120)
    ax.set_xscale("log" if dim["log"] else "linear")
    ax.set_xlim(dim["low"] / 1.15, dim["high"] * 1.15)
    ax.set_yscale("log")
    ax.set_xlabel(_short(name))
    ax.set_ylabel(f"{label}\nval loss" if dim is tuned["space"][0] else "")
    ax.grid(True, which="both", alpha=0.3)


def _draw_best_so_far(ax: Axes, trials: list[dict]) -> None:
    best, curve = math.inf, []
    for r in sorted(trials, key=lambda r: r["number"]):
        best = min(best, r["val_loss"]) if r["val_loss"] is not None else best
        curve.append(best if math.isfinite(best) else math.nan)
    ax.plot(range(1, len(curve) + 1), curve, marker="o")
    ax.set_xlabel("trials spent")
    ax.set_ylabel("best val loss so far")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def save_tuning_plot(tuning: dict, path: Path) -> None:
    """tuning.png of a tuned comparison."""
    from optcli.report.plots import save_figure

    save_figure(tuning_figure(tuning), path, dpi=100)
