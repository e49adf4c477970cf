"""Everything the user sees: Rich tables, progress displays and plots. The core never prints; this does."""

from __future__ import annotations

import math
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=transient)


class TrainProgress:
    """A progress bar over epochs (and the batches of the current one), fed by the training callbacks."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.progress = progress_bar()
        self.epoch_task = self.batch_task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, run_dir, start_epoch: int, data) -> None:
        self.epoch_task = self.progress.add_task("epochs", total=self.epochs, completed=start_epoch - 1, info="")
        self.batch_task = self.progress.add_task("batches", total=None, info="")

    def batch(self, epoch: int, i: int, n: int) -> None:
        self.progress.update(self.batch_task, completed=i, total=n, description=f"epoch {epoch}")

    def epoch(self, history) -> None:
        e = history.epochs[-1]
        info = f"train {fmt(e.train_loss)}" + (f"  val {fmt(e.val_loss)}" if e.val_loss is not None else "")
        self.progress.update(self.epoch_task, completed=e.epoch, info=info)


def epochs_table(history, every: int = 0, title: str = "Per-epoch metrics") -> Table:
    rows = history.epochs
    every = every or max(1, math.ceil(len(rows) / 20))  # about 20 rows, as the tutorial prints every 100th step
    has_val = any(e.val_loss is not None for e in rows)
    has_acc = any(e.val_accuracy is not None for e in rows)
    table = Table(title=title + (f" (every {every}th epoch)" if every > 1 else ""))
    table.add_column("epoch", justify="right")
    table.add_column("train loss", justify="right")
    if has_val:
        table.add_column("val loss", justify="right")
    if has_acc:
        table.add_column("val acc", justify="right")
    table.add_column("lr", justify="right")
    table.add_column("s/epoch", justify="right")
    for e in rows:
        if e.epoch % every and e is not rows[-1] and e.epoch != 1:
            continue
        cells = [str(e.epoch), fmt(e.train_loss)]
        cells += [fmt(e.val_loss)] if has_val else []
        cells += [pct(e.val_accuracy)] if has_acc else []
        table.add_row(*cells, fmt(e.lr), f"{e.seconds:.3f}")
    return table


def print_train_result(result, every: int = 0) -> None:
    h, s = result.history, result.summary
    console.print(epochs_table(h, every))
    status = {"completed": "[green]completed", "diverged": "[red]diverged", "interrupted": "[yellow]interrupted"}
    line = f"{status.get(h.status, h.status)}[/]: {s['epochs_completed']}/{s['epochs_planned']} epochs"
    if h.diverged_at:
        line += f", non-finite loss at epoch {h.diverged_at['epoch']} step {h.diverged_at['step']}"
    if s["best"]:
        b = s["best"]
        what = "val loss" if b["val_loss"] is not None else "train loss"
        line += f"; best {what} {fmt(b['val_loss'] if b['val_loss'] is not None else b['train_loss'])} at epoch {b['epoch']}"
    if h.test_loss is not None:
        line += f"; test loss {fmt(h.test_loss)}" + (f", test acc {pct(h.test_accuracy)}" if h.test_accuracy is not None else "")
    if s["seconds_per_epoch"]:
        line += f"; {s['seconds_per_epoch']:.3f} s/epoch on {s['device']}"
    console.print(line)
    console.print(f"run directory: {result.run_dir}")


def optimizers_table(rows: list[dict]) -> Table:
    table = Table(title="torch.optim optimizers (defaults read from their signatures)")
    table.add_column("name")
    table.add_column("defaults")
    for r in rows:
        table.add_row(r["name"], ", ".join(f"{k}={v}" for k, v in r["defaults"].items()))
    return table
