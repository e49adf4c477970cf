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


class LazyProgress:
    """A Rich progress display that appears only once work starts, so an input error prints one clean line."""

    def __init__(self):
        self.progress = progress_bar()
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.stop()
        return False

    def begin(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True


class TrainProgress(LazyProgress):
    """A progress bar over epochs (and the batches of the current one), fed by the training callbacks."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.epoch_task = self.batch_task = None

    def start(self, run_dir, start_epoch: int, data) -> None:
        self.begin()
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
    table = Table(title=title + (f", every {every} epochs" if every > 1 else ""))
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


def mean_pm(mean: Optional[float], std: Optional[float], as_pct: bool = False) -> str:
    if mean is None:
        return "—"
    if as_pct:
        return pct(mean) + (f" ± {100 * std:.2f}" if std is not None else "")
    return fmt(mean) + (f" ± {std:.2g}" if std is not None else "")


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[Optional[float]], width: int = 40) -> str:
    """Loss curves span orders of magnitude, so the line is drawn on a log scale."""
    pts = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not pts:
        return "—"
    step = max(1, math.ceil(len(values) / width))
    sampled = [values[i] for i in range(0, len(values), step)]
    lo, hi = math.log10(min(pts)), math.log10(max(pts))
    span = hi - lo or 1.0
    return "".join(" " if v is None or v <= 0 or not math.isfinite(v)
                   else SPARKS[min(len(SPARKS) - 1, int((math.log10(v) - lo) / span * len(SPARKS)))] for v in sampled)


def comparison_table(c) -> Table:
    classify = c.task == "classification"
    metrics = [("final_train_loss", "final train loss", True, False), ("best_val_loss", "best val loss", True, False)]
    if classify:
        metrics += [("val_accuracy", "val acc", False, True), ("test_accuracy", "test acc", False, True)]
    metrics = [m for m in metrics if any(r[m[0]] is not None for r in c.rows)]
    table = Table(title=f"Optimizers over {len(c.seeds)} seed(s) {c.seeds}, {c.epochs} epochs (mean ± std)")
    table.add_column("optimizer")
    table.add_column("hyperparameters")
    for _, title, _, _ in metrics:
        table.add_column(title, justify="right")
    table.add_column("epochs to best", justify="right")
    table.add_column("s/epoch", justify="right")
    table.add_column("status")
    best = {}
    for key, _, lower, _ in metrics:
        done = [r for r in c.rows if r[key] is not None]
        if done:
            best[key] = (min if lower else max)(done, key=lambda r: r[key])["label"]
    for r in c.rows:
        cells = [r["label"], ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()) or "defaults"]
        for key, _, _, as_pct in metrics:
            text = mean_pm(r[key], r[key + "_std"], as_pct)
            cells.append(f"[bold green]{text}[/]" if best.get(key) == r["label"] else text)
        cells += [mean_pm(r["epochs_to_best"], r["epochs_to_best_std"]), fmt(r["seconds_per_epoch"], 3)]
        status = r["status"] if not r["diverged_at"] else r["status"] + " (" + ", ".join(
            f"seed {d['seed']} epoch {d['epoch']}" for d in r["diverged_at"]) + ")"
        cells.append(f"[red]{status}[/]" if r["diverged_at"] else status)
        table.add_row(*cells)
    return table


def curve_table(c, max_rows: int = 30) -> Table:
    """Validation loss per epoch, one column per optimizer, best per row highlighted; sparklines when long."""
    kind = "val_loss" if any(p[0] is not None for cur in c.curves.values() for p in cur["val_loss"]) else "train_loss"
    title = ("validation" if kind == "val_loss" else "training") + " loss per epoch (mean over seeds)"
    labels = [s.label for s in c.specs]
    if c.epochs > max_rows:
        table = Table(title=title + ", log scale")
        table.add_column("optimizer")
        table.add_column(f"epochs 1 → {c.epochs}")
        table.add_column("last", justify="right")
        for label in labels:
            means = [p[0] for p in c.curves[label][kind]]
            last = next((v for v in reversed(means) if v is not None), None)
            table.add_row(label, sparkline(means), fmt(last))
        return table
    table = Table(title=title)
    table.add_column("epoch", justify="right")
    for label in labels:
        table.add_column(label, justify="right")
    for e in range(c.epochs):
        values = {label: c.curves[label][kind][e][0] for label in labels}
        finite = [v for v in values.values() if v is not None]
        low = min(finite) if finite else None
        table.add_row(str(e + 1), *[(f"[bold green]{fmt(v)}[/]" if v is not None and v == low else fmt(v))
                                    for v in values.values()])
    return table


def tuning_table(tuning: dict) -> Table:
    table = Table(title=f"Learning-rate tuning: {tuning['budget']} learning rates per optimizer, seed {tuning['seed']}, "
                        f"chosen by {tuning['selected_by']}")
    table.add_column("optimizer")
    table.add_column("grid (lr: val loss)")
    table.add_column("chosen lr", justify="right")
    for label, t in tuning["optimizers"].items():
        grid = ", ".join(f"{fmt(lr, 3)}: {fmt(v, 3)}" for lr, v in zip(t["grid"], t["val_loss"]))
        table.add_row(label, grid, fmt(t["chosen_lr"], 3) + (" [yellow](grid edge)[/]" if t["at_edge"] else ""))
    edge = [label for label, t in tuning["optimizers"].items() if t["at_edge"]]
    if edge:
        table.caption = (f"{', '.join(edge)}: the best lr is at the edge of the grid; the optimum may lie beyond it "
                         f"(give an lr in the spec to move the grid)")
    return table


def print_comparison(c) -> None:
    if c.tuning:
        console.print(tuning_table(c.tuning))
    console.print(comparison_table(c))
    console.print(curve_table(c))
    console.print("[bold]Verdict[/]")
    for v in c.verdicts:
        console.print(f"  {v['name']}: {v['text']}")
    if not c.verdicts:
        console.print("  fewer than two optimizers completed every seed: no verdict")
    outside = c.wall_seconds - c.epoch_seconds / c.jobs
    if c.wall_seconds:
        console.print(f"wall time {c.wall_seconds:.1f} s ({c.epoch_seconds:.1f} s inside training epochs"
                      + (f", {c.jobs} jobs" if c.jobs > 1 else f", {max(outside, 0):.1f} s outside") + ")")
    console.print(f"files: {c.run_dir}")


def save_loss_plot(c, path) -> None:
    """loss.png: mean loss per optimizer with the seed spread (min to max over seeds) as a band, log scale;
    train and validation side by side."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optcli.runs import atomic_write_bytes

    kinds = [k for k in ("train_loss", "val_loss") if any(p[0] is not None for cur in c.curves.values() for p in cur[k])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for label, cur in c.curves.items():
            pts = [(i + 1, mean, lo, hi) for i, (mean, _, lo, hi) in enumerate(cur[kind]) if mean is not None]
            if not pts:
                continue
            x, mean, lo, hi = zip(*pts)
            line, = ax.plot(x, mean, label=label)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(("training" if kind == "train_loss" else "validation") + " loss")
        ax.set_yscale("log")
        ax.set_title(f"{'Training' if kind == 'train_loss' else 'Validation'} loss: mean, band min–max over {len(c.seeds)} seed(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


class CompareProgress(LazyProgress):
    """One bar over all (optimizer, seed) trials, and one over the epochs of the trial under way."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.trials = self.current = None

    def plan(self, n_trials: int) -> None:
        self.begin()
        self.trials = self.progress.add_task("trials", total=n_trials, info="")
        self.current = self.progress.add_task("epochs", total=self.epochs, info="")

    def trial_start(self, label: str, seed: int) -> None:
        self.progress.update(self.current, completed=0, description=f"{label} seed {seed}", info="")

    def epoch(self, history) -> None:
        e = history.epochs[-1]
        self.progress.update(self.current, completed=e.epoch, info=f"loss {fmt(e.val_loss if e.val_loss is not None else e.train_loss)}")

    def trial_done(self, label: str, seed: int, history) -> None:
        self.progress.update(self.trials, advance=1, info=f"{label} seed {seed}: {history.status}")


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def print_inspection(r) -> None:
    t = Table(title=f"Parameters ({r.source})")
    for col, just in [("name", "left"), ("shape", "left"), ("numel", "right"), ("dtype/device", "left"),
                      ("requires_grad", "left"), ("mean", "right"), ("std", "right"), ("min", "right"), ("max", "right")]:
        t.add_column(col, justify=just, overflow="fold")
    for p in r.params:
        t.add_row(p["name"], _shape(p["shape"]), f"{p['numel']:,}", f"{p['dtype']} {p['device']}",
                  "[green]True[/] trainable" if p["requires_grad"] else "[yellow]False[/] frozen",
                  *(fmt(p[k], 3) for k in ("mean", "std", "min", "max")))
    console.print(t)
    console.print(f"trainable {r.totals['trainable']:,} · frozen {r.totals['frozen']:,} · total {r.totals['total']:,} elements")

    t = Table(title="state_dict: what model.state_dict() saves")
    for col in ("key", "kind", "shape", "dtype"):
        t.add_column(col)
    for e in r.state_dict:
        t.add_row(e["key"], e["kind"] if e["kind"] == "parameter" else f"[cyan]{e['kind']}[/]", _shape(e["shape"]), e["dtype"])
    console.print(t)

    t = Table(title=f"{r.optimizer}: param_groups")
    t.add_column("group", justify="right")
    t.add_column("hyperparameters")
    t.add_column("parameters held")
    for g in r.groups:
        t.add_row(str(g["index"]), ", ".join(f"{k}={v}" for k, v in g["hyperparameters"].items()),
                  ", ".join(g["params"]) + f" ({g['numel']:,} elements)")
    console.print(t)

    if r.optimizer_state:
        t = Table(title=f"{r.optimizer}: per-parameter state (optimizer.state)")
        for col in ("parameter", "key", "shape", "norm / value"):
            t.add_column(col)
        for s in r.optimizer_state:
            t.add_row(s["param"], s["key"], _shape(s["shape"]), fmt(s["norm"]) if s["norm"] is not None else fmt(s["value"]))
        console.print(t)
    else:
        console.print(f"{r.optimizer}: per-parameter state is empty (it is created by the first step())")

    link = r.linkage
    if link["ok"]:
        console.print(f"[green]linkage ok[/]: the optimizer holds all {link['trainable']} trainable parameters of the model, "
                      f"by identity, and nothing else")
    else:
        for problem in link["problems"]:
            console.print(f"[red]linkage problem[/]: {problem}")

    modes = r.modes
    console.print(f"mode: model.training = {modes['training']} ({'train()' if modes['training'] else 'eval()'})")
    if modes["modules"]:
        t = Table(title="Modules that behave differently under train() and eval()")
        for col in ("module", "type", "training", "in train()", "in eval()"):
            t.add_column(col)
        for m in modes["modules"]:
            t.add_row(m["name"], m["type"], str(m["training"]), m["train"], m["eval"])
        console.print(t)
    else:
        console.print("no module behaves differently under train() and eval() (no Dropout, no BatchNorm)")

    if r.step:
        s = r.step
        t = Table(title=f"One step on a batch of {s['batch_size']} (loss {fmt(s['loss'])}): backward() then step()")
        for col, just in [("parameter", "left"), ("grad norm", "right"), ("update norm", "right"), ("changed", "left")]:
            t.add_column(col, justify=just)
        for p in s["params"]:
            t.add_row(p["name"], fmt(p["grad_norm"]) if p["requires_grad"] else "[yellow]None (frozen)[/]",
                      fmt(p["update_norm"]), "yes" if p["changed"] else "no")
        console.print(t)
        rule = s["sgd_rule"]
        if rule["applies"]:
            verdict = "[green]holds[/]" if rule["holds"] else "[red]does NOT hold[/]"
            console.print(f"SGD rule w ← w − lr·grad {verdict}: max |w_new − (w − lr·grad)| = {rule['max_abs_error']:.3g}")
        else:
            console.print(f"SGD rule check: {rule['why']}")
        acc = s["accumulation"]
        console.print(f"second backward() without zero_grad(): grad norm × {acc['grad_norm_ratio_min']:.6g}"
                      f"–{acc['grad_norm_ratio_max']:.6g}, max |g₂ − 2·g₁| = {acc['max_abs_error_vs_2x']:.3g}: "
                      + ("gradients add up (doubled)" if acc["doubled"] else "[red]not doubled[/]"))
    for note in r.notes:
        console.print(f"note: {note}")
