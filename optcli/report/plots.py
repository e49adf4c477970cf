"""Plots written next to a run's files. Each plot is a pure `*_figure` builder, which tests read back, and a
`save_*` that writes its PNG. Figures are made without pyplot: no global state, no backend to choose, nothing to
close."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the report layer stays light: matplotlib and the core's types only when drawing or checking
    from matplotlib.figure import Figure

    from optcli.compare.comparison import Comparison
    from optcli.engine.loop import History
    from optcli.lr_find import LrFindResult


def new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def png_bytes(fig: Figure, *, dpi: int = 110) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def drawn(path: Path, draw: Callable[[Path], None]) -> str | None:
    """Draw one figure to `path`; one that cannot be drawn (e.g. matplotlib's OverflowError on a log axis from
    1e-300 to 1e300) is a warning line, not a failure: the run's results and other files stand. The operating
    system's refusals (a full disk) are not caught here: they fail the run as any other file would."""
    import warnings

    try:
        with warnings.catch_warnings():  # numpy's overflow warnings on the way to such an error
            warnings.simplefilter("ignore", RuntimeWarning)
            draw(path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 a figure is a view of files already written
        text = str(exc).strip().splitlines()
        return f"{path.name} not drawn ({type(exc).__name__}: {text[0][:200] if text else ''})"
    return None


def save_figure(fig: Figure, path: Path, *, dpi: int = 110) -> None:
    """The figure as a PNG, written atomically."""
    from optcli.rundir.files import atomic_write_bytes

    atomic_write_bytes(path, png_bytes(fig, dpi=dpi))


def _margins(
    fig: Figure,
    *,
    left: float = 1.0,
    right: float = 0.25,
    top: float = 0.45,
    bottom: float = 0.55,
    wspace: float = 0.3,
    hspace: float = 0.55,
) -> None:
    """Fixed margins in inches instead of tight_layout, which measures every tick label of the log axes: 0.6 s of
    the 1.4 s dynamics.png took, on the plots every comparison writes."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=wspace,
        hspace=hspace,
    )


def loss_figure(comparison: Comparison) -> Figure:
    """Mean loss per optimizer with the seed spread (min to max over seeds) as a band, log scale; train and
    validation side by side."""
    curves = comparison.curves
    kinds = [
        k for k in ("train_loss", "val_loss") if any(p[0] is not None for curve in curves.values() for p in curve[k])
    ] or ["train_loss"]  # an empty frame when no trial has a finite loss (all failed or diverged at once)
    fig = new_figure((6 * len(kinds), 4.5))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for label, curve in curves.items():
            points = [(i + 1, mean, lo, hi) for i, (mean, _, lo, hi) in enumerate(curve[kind]) if mean is not None]
            if not points:
                continue
            epochs, means, lows, highs = zip(*points, strict=True)
            (line,) = ax.plot(epochs, means, label=label)
            ax.fill_between(epochs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(("training" if kind == "train_loss" else "validation") + " loss")
        ax.set_yscale("log")
        ax.set_title(
            f"{'Training' if kind == 'train_loss' else 'Validation'} loss: mean, "
            f"band min–max over {len(comparison.seeds)} seed(s)"
        )
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # every trial failed: nothing drawn to label
            ax.legend()
    _margins(fig)
    return fig


def save_loss_plot(comparison: Comparison, path: Path) -> None:
    """loss.png of a comparison."""
    save_figure(loss_figure(comparison), path)


def lr_find_figure(result: LrFindResult) -> Figure:
    """The raw and smoothed loss against the lr (log x), the suggestion and the lowest loss marked."""
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    if result.lrs:
        ax.plot(result.lrs[: len(result.losses)], result.losses, color="0.75", linewidth=1, label="batch loss")
        ax.plot(result.lrs[: len(result.smoothed)], result.smoothed, color="C0", linewidth=2, label="smoothed")
    if result.suggestion is not None and result.suggestion_index is not None:
        label = f"suggestion ({result.rule}): {result.suggestion:.2e}"
        ax.axvline(result.suggestion, color="C3", linestyle="--", label=label)
        ax.plot([result.suggestion], [result.smoothed[result.suggestion_index]], "o", color="C3")
    if result.min_loss_lr is not None:
        ax.axvline(result.min_loss_lr, color="0.4", linestyle=":", label=f"lowest loss: {result.min_loss_lr:.2e}")
    ax.set_xscale("log")
    smoothed = result.smoothed
    if smoothed and min(smoothed) > 0:
        ax.set_yscale("log")
        top = max(smoothed[0], min(smoothed) * 4)
        ax.set_ylim(min(min(smoothed), min(result.losses)) * 0.8, top * 1.5)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Learning-rate range test: {result.optimizer}, {len(smoothed)} steps, stopped: {result.stopped}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save_lr_find_plot(result: LrFindResult, path: Path) -> None:
    """lr_find.png."""
    save_figure(lr_find_figure(result), path)


def run_figure(history: History) -> Figure:
    """One training run: train and validation loss on a log scale with the lr on its own (right, log) axis;
    validation accuracy in a second panel when the task has one."""
    epochs = history.epochs
    has_acc = any(e.val_accuracy is not None for e in epochs)
    fig = new_figure((12 if has_acc else 7, 4.5))
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)
    ax = axes[0][0]
    for key, label, color in (("train_loss", "train loss", "C0"), ("val_loss", "validation loss", "C1")):
        points = [(e.epoch, v) for e in epochs if (v := getattr(e, key)) is not None and math.isfinite(v) and v > 0]
        if points:
            ax.plot(*zip(*points, strict=True), color=color, label=label, marker="." if len(points) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    lr_ax = ax.twinx()
    lrs = [(e.epoch, e.lr) for e in epochs if e.lr > 0]
    if lrs:
        lr_ax.plot(*zip(*lrs, strict=True), color="0.5", linestyle="--", linewidth=1, label="lr")
        lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate (log scale)", color="0.4")
    lines = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper right")
    ax.set_title(f"Training run: {len(epochs)} epochs, {history.status}")
    if has_acc:
        acc_ax = axes[0][1]
        points = [(e.epoch, 100 * e.val_accuracy) for e in epochs if e.val_accuracy is not None]
        acc_ax.plot(*zip(*points, strict=True), color="C2", marker="." if len(points) < 30 else None)
        acc_ax.set_xlabel("epoch")
        acc_ax.set_ylabel("validation accuracy (%)")
        acc_ax.set_title("Validation accuracy")
        acc_ax.grid(True, alpha=0.3)
    _margins(fig, left=1.0, right=0.8, wspace=0.45)  # room for the lr axis on the right
    return fig


def save_run_plot(history: History, path: Path) -> None:
    """loss.png of one training run."""
    save_figure(run_figure(history), path)


DYNAMICS = (
    ("grad_norm", "gradient norm ||g|| (RMS over every 10th step)"),
    ("update_ratio", "update / weight ||Δw||/||w|| (one step)"),
    ("step_size", "effective step size ||Δw||/||g||"),
)


def dynamics_means(comparison: Comparison, label: str, layer: str, key: str) -> dict[int, float]:
    """epoch -> the mean over seeds of one measure of one layer, for one optimizer (positive values only)."""
    per_epoch: dict[int, list[float]] = {}
    for trial in comparison.trials:
        if trial.label != label:
            continue
        for e in trial.history.epochs:
            value = (e.dynamics or {}).get("layers", {}).get(layer, {}).get(key)
            if value is not None and value > 0:
                per_epoch.setdefault(e.epoch, []).append(value)
    return {epoch: sum(values) / len(values) for epoch, values in sorted(per_epoch.items())}


def dynamics_figure(comparison: Comparison) -> Figure:
    """One row per measure (gradient norm, update-to-weight ratio, effective step size), one column per layer,
    one line per optimizer (mean over seeds), log scale."""
    layers = list(
        dict.fromkeys(
            layer
            for trial in comparison.trials
            for e in trial.history.epochs
            if e.dynamics
            for layer in e.dynamics["layers"]
        )
    )
    fig = new_figure((4.5 * len(layers) + 1, 3.2 * len(DYNAMICS)))
    axes = fig.subplots(len(DYNAMICS), len(layers), squeeze=False)
    for row, (key, title) in enumerate(DYNAMICS):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for i, spec in enumerate(comparison.specs):
                means = dynamics_means(comparison, spec.label, layer, key)
                if means:
                    ax.plot(list(means), list(means.values()), color=f"C{i}", label=spec.label)
            ax.set_yscale("log")
            ax.set_title(f"{layer}: {title}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # nothing drawn when every trial had no dynamics
        axes[0][0].legend(fontsize=8)
    _margins(fig, left=0.7, wspace=0.25)
    return fig


def save_dynamics_plot(comparison: Comparison, path: Path) -> None:
    """dynamics.png of a comparison."""
    save_figure(dynamics_figure(comparison), path)


def trajectory_figure(comparison: Comparison, grid: dict[str, list]) -> Figure:
    """The path each optimizer takes on a 2-D test function, drawn on its contour plot (`grid`: x, y and the
    function's values z, tasks.functions.grid) with log-spaced levels of f minus its lowest value on the grid; one
    colour per optimizer, one line per seed; the start points marked by circles, the known minimum by a star."""
    import numpy as np
    from matplotlib.colors import LogNorm

    function = comparison.function
    assert function is not None, "a trajectory plot needs a comparison on a 2-D test function"
    values = np.asarray(grid["z"], dtype=float)
    shifted = values - values.min() + 1e-6 * (np.ptp(values) or 1.0)  # > 0 for the log levels
    fig = new_figure((7.5, 6.5))
    ax = fig.subplots()
    levels = np.logspace(np.log10(shifted.min()), np.log10(shifted.max()), 30)
    ax.contourf(grid["x"], grid["y"], shifted, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.55)
    ax.contour(grid["x"], grid["y"], shifted, levels=levels, norm=LogNorm(), colors="0.35", linewidths=0.4)
    starts = function["starts"]
    for i, spec in enumerate(comparison.specs):
        for k, trial in enumerate(t for t in comparison.trials if t.label == spec.label):
            start = starts.get(trial.seed, starts.get(str(trial.seed)))
            path = [start] + [
                [e.position["x"], e.position["y"]]
                for e in trial.history.epochs
                if e.position and e.position["x"] is not None and e.position["y"] is not None
            ]
            xs, ys = zip(*path, strict=True)
            width = max(1.0, 2.8 - 0.5 * i)  # earlier optimizers wider, so a path drawn over another still shows
            ax.plot(xs, ys, color=f"C{i}", linewidth=width, alpha=0.9, label=spec.label if k == 0 else None)
            ax.plot(xs[-1:], ys[-1:], "x", color=f"C{i}", markersize=7)
    for start in starts.values():
        ax.plot([start[0]], [start[1]], "o", color="black", markerfacecolor="white", markersize=7)
    minimum = function["minimum"]
    ax.plot([minimum[0]], [minimum[1]], "*", color="gold", markeredgecolor="black", markersize=16)
    x0, x1, y0, y1 = function["box"]
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(
        f"{function['name']}: {comparison.epochs} steps from ○ towards ★ {tuple(minimum)}, "
        f"{len(comparison.seeds)} seed(s); × end"
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def save_trajectory_plot(comparison: Comparison, grid: dict[str, list], path: Path) -> None:
    """trajectories.png of a comparison on a 2-D test function."""
    save_figure(trajectory_figure(comparison, grid), path)
