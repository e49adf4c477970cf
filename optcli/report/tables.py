"""Rich tables and the printed summaries of train, compare and optimizers."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.table import Table

from optcli.report.console import console
from optcli.report.format import fmt, mean_pm, nbytes, pct, sparkline
from optcli.report.layout import Col, fitted_table

if TYPE_CHECKING:
    from optcli.compare.comparison import Comparison
    from optcli.engine.loop import History
    from optcli.lr_find import LrFindResult
    from optcli.rundir.run import TrainResult


def epochs_table(history: History, every: int = 0, title: str = "Per-epoch metrics") -> Table:
    rows = history.epochs
    every = every or max(1, math.ceil(len(rows) / 20))  # about 20 rows, as the tutorial prints every 100th step
    has_val = any(e.val_loss is not None for e in rows)
    has_acc = any(e.val_accuracy is not None for e in rows)
    has_r2 = any(getattr(e, "val_r2", None) is not None for e in rows)
    table = Table(title=title + (f", every {every} epochs" if every > 1 else ""))
    table.add_column("epoch", justify="right")
    table.add_column("train loss", justify="right")
    if has_val:
        table.add_column("val loss", justify="right")
    if has_acc:
        table.add_column("val acc", justify="right")
    if has_r2:
        table.add_column("val R²", justify="right")
    table.add_column("lr", justify="right")
    table.add_column("s/epoch", justify="right")
    for e in rows:
        if e.epoch % every and e is not rows[-1] and e.epoch != 1:
            continue
        cells = [str(e.epoch), fmt(e.train_loss)]
        cells += [fmt(e.val_loss)] if has_val else []
        cells += [pct(e.val_accuracy)] if has_acc else []
        cells += [fmt(e.val_r2)] if has_r2 else []
        table.add_row(*cells, fmt(e.lr), f"{e.seconds:.3f}")
    return table


def print_train_result(result: TrainResult, every: int = 0) -> None:
    h, s = result.history, result.summary
    console.print(epochs_table(h, every))
    status = {
        "completed": "[green]completed",
        "stopped_early": "[green]stopped early",
        "diverged": "[red]diverged",
        "interrupted": "[yellow]interrupted",
    }
    line = f"{status.get(h.status, h.status)}[/]: {s['epochs_completed']}/{s['epochs_planned']} epochs"
    if h.stopped_early:
        stop = h.stopped_early
        line += f" (no {stop['metric']} improvement since epoch {stop['best_epoch']})"
    if h.diverged_at:
        line += f", non-finite loss at epoch {h.diverged_at['epoch']} step {h.diverged_at['step']}"
    if s["best"]:
        b = s["best"]
        what = "val loss" if b["val_loss"] is not None else "train loss"
        value = b["val_loss"] if b["val_loss"] is not None else b["train_loss"]
        line += f"; best {what} {fmt(value)} at epoch {b['epoch']}"
        if s.get("excess_val_loss") is not None:
            line += f" ({fmt(s['excess_val_loss'])} above the noise floor {fmt(s['val_loss_floor'])})"
    if h.test_loss is not None:
        line += f"; test loss {fmt(h.test_loss)}" + (
            f", test acc {pct(h.test_accuracy)}" if h.test_accuracy is not None else ""
        )
    if s["seconds_per_epoch_median_warm"]:  # the median after the cold first epoch
        line += f"; {s['seconds_per_epoch_median_warm']:.3f} s/epoch on {s['device']}"
    console.print(line)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"run directory: {result.run_dir}")


def optimizers_table(rows: list[dict]) -> Table:
    sources = sorted({r["source"] for r in rows}, key=lambda s: s != "torch.optim")
    table = Table(title=f"Optimizers from {' and '.join(sources)} (defaults read from their signatures)")
    table.add_column("name")
    table.add_column("source")
    table.add_column("defaults")
    for r in rows:
        modes = " [cyan](train/eval modes)[/]" if r.get("modes") else ""
        table.add_row(r["name"], r["source"], ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) + modes)
    if "pytorch-optimizer" not in sources:
        table.caption = "more with optcli[zoo]: pip install 'optcli[zoo]'; any class by import path: pkg.module:Class"
    else:
        table.caption = "any other class by import path: pkg.module:Class (or pkg.module.Class)"
    return table


def comparison_table(comparison: Comparison) -> Table:
    from optcli.tasks.base import kind_columns

    # (key, header, lower is better, as a percentage, priority when the terminal is narrow)
    metrics = [
        ("final_train_loss", "final train loss", True, False, 600),
        ("best_val_loss", "best val loss", True, False, 800),
        *kind_columns(comparison.task),  # the scores of the task's kind: accuracy, R², f(x, y)
    ]
    metrics = [m for m in metrics if any(r.get(m[0]) is not None for r in comparison.rows)]
    cols = [Col("optimizer", "name", 1000), Col("hyperparameters", "text", 500)]
    cols += [Col(header, "num", priority) for _, header, _, _, priority in metrics]
    floor = getattr(comparison, "loss_floor", None)
    has_excess = floor is not None and any(r.get("excess_val_loss") is not None for r in comparison.rows)
    if has_excess:
        cols.append(Col(f"excess val loss (floor {fmt(floor)})", "num", 550))
    target = getattr(comparison, "target", None)
    if target:
        relation = ">=" if target["higher_is_better"] else "<="
        cols.append(Col(f"to {target['metric']} {relation} {target['value']:g}", "text", 850))
    cols += [Col("epochs to best", "num", 300), Col("s/epoch", "num", 200)]
    has_state = any(r.get("state_bytes") is not None for r in comparison.rows)
    if has_state:
        cols.append(Col("optimizer state", "num", 250))
    cols.append(Col("status", "text", 900))
    best = {}
    for key, _, lower, _, _ in metrics:
        done = [r for r in comparison.rows if r.get(key) is not None]
        if done:
            best[key] = (min if lower else max)(done, key=lambda r: r[key])["label"]
    rows = []
    for r in comparison.rows:
        cells = [r["label"], ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()) or "defaults"]
        for key, _, _, as_pct, _ in metrics:
            text = mean_pm(r.get(key), r.get(key + "_std"), as_pct)
            cells.append(f"[bold green]{text}[/]" if best.get(key) == r["label"] else text)
        cells += [fmt(r.get("excess_val_loss"))] if has_excess else []
        cells += [target_cell(r, len(comparison.seeds))] if target else []
        cells += [mean_pm(r["epochs_to_best"], r["epochs_to_best_std"]), fmt(r["seconds_per_epoch_median_warm"], 3)]
        cells += [nbytes(r.get("state_bytes"))] if has_state else []
        status = r["status"]
        if r["diverged_at"]:
            status += " (" + ", ".join(f"seed {d['seed']} epoch {d['epoch']}" for d in r["diverged_at"]) + ")"
        failed = r.get("failed") or []
        status += "".join(f" (seed {f['seed']} failed: {f['error']})" for f in failed)
        cells.append(f"[red]{status}[/]" if r["diverged_at"] or failed else status)
        rows.append(cells)
    title = (
        f"Optimizers over {len(comparison.seeds)} seed(s) {comparison.seeds}, {comparison.epochs} epochs (mean ± std)"
    )
    return fitted_table(title, cols, rows)


def target_cell(row: dict, seeds: int) -> str:
    """Time to target over the seeds that met it: epochs, optimizer steps and training seconds, and how many."""
    if not row.get("target_reached"):
        return f"not reached (0/{seeds})"
    return (
        f"epoch {mean_pm(row['target_epoch'], row['target_epoch_std'])}, "
        f"{mean_pm(row['target_steps'], row['target_steps_std'])} steps, "
        f"{mean_pm(row['target_seconds'], row['target_seconds_std'])} s, reached {row['target_reached']}/{seeds}"
    )


def curve_table(comparison: Comparison, max_rows: int = 30) -> Table:
    """Validation loss per epoch, one column per optimizer, best per row highlighted; sparklines when long."""
    kind = (
        "val_loss"
        if any(p[0] is not None for cur in comparison.curves.values() for p in cur["val_loss"])
        else "train_loss"
    )
    title = ("validation" if kind == "val_loss" else "training") + " loss per epoch (mean over seeds)"
    labels = [s.label for s in comparison.specs]
    shown = max((len(comparison.curves[label][kind]) for label in labels), default=0)  # the epochs any trial ran
    if shown > max_rows:
        table = Table(title=title + ", log scale")
        table.add_column("optimizer")
        table.add_column(f"epochs 1 → {shown}")
        table.add_column("last", justify="right")
        for label in labels:
            means = [p[0] for p in comparison.curves[label][kind]]
            last = next((v for v in reversed(means) if v is not None), None)
            table.add_row(label, sparkline(means), fmt(last))
        return table
    table = Table(title=title)
    table.add_column("epoch", justify="right")
    for label in labels:
        table.add_column(label, justify="right")
    for e in range(shown):
        values = {label: comparison.curves[label][kind][e][0] for label in labels}
        finite = [v for v in values.values() if v is not None]
        low = min(finite) if finite else None
        table.add_row(
            str(e + 1),
            *[(f"[bold green]{fmt(v)}[/]" if v is not None and v == low else fmt(v)) for v in values.values()],
        )
    return table


def print_comparison(comparison: Comparison) -> None:
    if comparison.tuning:
        from optcli.report.tuning import print_tuning

        print_tuning(comparison.tuning, console)
    for note in comparison.notes:
        console.print(f"[yellow]{note}[/]")
    console.print(comparison_table(comparison))
    console.print(curve_table(comparison))
    console.print("[bold]Verdict[/]")
    for v in comparison.verdicts:
        console.print(f"  {v['name']}: {v['text']}")
    if not comparison.verdicts:
        console.print("  fewer than two optimizers completed every seed: no verdict")
    for warning in getattr(comparison, "warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    outside = comparison.wall_seconds - comparison.epoch_seconds / comparison.jobs
    if comparison.wall_seconds:
        console.print(
            f"wall time {comparison.wall_seconds:.1f} s ({comparison.epoch_seconds:.1f} s inside training epochs"
            + (f", {comparison.jobs} jobs" if comparison.jobs > 1 else f", {max(outside, 0):.1f} s outside")
            + ")"
        )
    console.print(f"files: {comparison.run_dir}")


def lr_find_table(result: LrFindResult, rows: int = 12) -> Table:
    """About `rows` points of the range test, evenly spaced in steps, the suggested one highlighted."""
    table = Table(title=f"lr range test: {result.optimizer}, lr {fmt(result.min_lr, 2)}→{fmt(result.max_lr, 2)}")
    table.add_column("step", justify="right")
    table.add_column("lr", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("smoothed", justify="right")
    n = len(result.smoothed)
    suggested = {result.suggestion_index} if result.suggestion_index is not None else set()
    shown = sorted({round(i * (n - 1) / max(1, rows - 1)) for i in range(rows)} | suggested)
    for i in shown if n else []:
        cells = [str(i + 1), fmt(result.lrs[i], 3), fmt(result.losses[i]), fmt(result.smoothed[i])]
        table.add_row(*([f"[bold green]{c}[/]" for c in cells] if i == result.suggestion_index else cells))
    # clipped at the starting loss so that the final blow-up does not flatten the rest of the curve
    clipped = [min(v, result.smoothed[0]) for v in result.smoothed] if n else []
    table.caption = "smoothed loss (log): " + sparkline(clipped, width=25)
    return table


def print_lr_find(result: LrFindResult) -> None:
    console.print(lr_find_table(result))
    why = (
        "steepest descent of the smoothed loss per decade of lr"
        if result.rule == "steepest"
        else "the lr of the lowest smoothed loss, divided by 10"
    )
    stop = "the loss diverged" if result.stopped == "diverged" else "it reached the maximum lr"
    console.print(f"{len(result.smoothed)}/{result.steps} steps; stopped because {stop}; {result.seconds:.1f} s")
    if result.suggestion is None:
        console.print("[yellow]no suggestion[/]: the curve is too short or never falls (widen --min-lr/--max-lr)")
    else:
        console.print(f"suggested lr: [bold]{result.suggestion:.3g}[/] ({why})")
    if result.plot:
        console.print(f"plot: {result.plot}")
