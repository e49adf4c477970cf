"""The tuning of a comparison on the terminal (the search spaces, every trial, the winners) and in tuning.png."""

from __future__ import annotations

import math

from rich.table import Table

from optcli.report.format import fmt

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


def print_tuning(tuning: dict, console) -> None:
    console.print(space_table(tuning))
    console.print(trials_table(tuning))
    console.print(winners_table(tuning))


def save_tuning_plot(tuning: dict, path) -> None:
    """tuning.png: per optimizer (a row), the validation loss of every trial against each hyperparameter
    (log axes; failed trials as red crosses on the top edge), and the best-so-far against trials spent."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optcli.rundir.files import atomic_write_bytes

    rows = list(tuning["optimizers"].items())
    cols = 1 + max(len(t["space"]) for _, t in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 2.8 * len(rows)), squeeze=False)
    for ax_row, (label, t) in zip(axes, rows, strict=True):
        done = [r for r in t["trials"] if r["val_loss"] is not None]
        failed = [r for r in t["trials"] if r["val_loss"] is None]
        top = max((r["val_loss"] for r in done), default=1.0)
        for ax, d in zip(ax_row, t["space"], strict=False):
            ax.scatter([r["params"][d["name"]] for r in done], [r["val_loss"] for r in done], s=18)
            if failed:
                ax.scatter([r["params"][d["name"]] for r in failed], [top] * len(failed), marker="x", c="red", s=24)
            if t["best"]:
                ax.scatter([t["best"]["params"][d["name"]]], [t["best"]["val_loss"]], marker="*", c="gold", s=120)
            ax.set_xscale("log" if d["log"] else "linear")
            ax.set_xlim(d["low"] / 1.15, d["high"] * 1.15)
            ax.set_yscale("log")
            ax.set_xlabel(_short(d["name"]))
            ax.set_ylabel(f"{label}\nval loss" if d is t["space"][0] else "")
            ax.grid(True, which="both", alpha=0.3)
        for ax in ax_row[len(t["space"]) : cols - 1]:
            ax.axis("off")
        best, curve = math.inf, []
        for r in sorted(t["trials"], key=lambda r: r["number"]):
            best = min(best, r["val_loss"]) if r["val_loss"] is not None else best
            curve.append(best if math.isfinite(best) else None)
        ax = ax_row[-1]
        ax.plot(range(1, len(curve) + 1), [float("nan") if c is None else c for c in curve], marker="o")
        ax.set_xlabel("trials spent")
        ax.set_ylabel("best val loss so far")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Tuning: {tuning['budget']} quasi-random trials per optimizer, validation loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
