"""Plots written next to a run's files (matplotlib, headless)."""

from __future__ import annotations

import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """The figure as a PNG, written atomically; the figure is closed."""
    import io

    from optcli.rundir.files import atomic_write_bytes

    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _margins(fig, *, left=1.0, right=0.25, top=0.45, bottom=0.55, wspace=0.3, hspace=0.55) -> None:
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


def save_loss_plot(c, path) -> None:
    """loss.png: mean loss per optimizer with the seed spread (min to max over seeds) as a band, log scale;
    train and validation side by side."""
    plt = _pyplot()
    kinds = [
        k for k in ("train_loss", "val_loss") if any(p[0] is not None for cur in c.curves.values() for p in cur[k])
    ] or ["train_loss"]  # an empty frame when no trial has a finite loss (all failed or diverged at once)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for label, cur in c.curves.items():
            pts = [(i + 1, mean, lo, hi) for i, (mean, _, lo, hi) in enumerate(cur[kind]) if mean is not None]
            if not pts:
                continue
            x, mean, lo, hi = zip(*pts, strict=True)
            (line,) = ax.plot(x, mean, label=label)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(("training" if kind == "train_loss" else "validation") + " loss")
        ax.set_yscale("log")
        ax.set_title(
            f"{'Training' if kind == 'train_loss' else 'Validation'} loss: mean, "
            f"band min–max over {len(c.seeds)} seed(s)"
        )
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # every trial failed: nothing drawn to label
            ax.legend()
    _margins(fig)
    _save(fig, path)


def save_lr_find_plot(r, path) -> None:
    """lr_find.png: the raw and smoothed loss against the lr (log x), the suggestion and the lowest loss marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if r.lrs:
        ax.plot(r.lrs[: len(r.losses)], r.losses, color="0.75", linewidth=1, label="batch loss")
        ax.plot(r.lrs[: len(r.smoothed)], r.smoothed, color="C0", linewidth=2, label="smoothed")
    if r.suggestion is not None:
        ax.axvline(r.suggestion, color="C3", linestyle="--", label=f"suggestion ({r.rule}): {r.suggestion:.2e}")
        ax.plot([r.suggestion], [r.smoothed[r.suggestion_index]], "o", color="C3")
    if r.min_loss_lr is not None:
        ax.axvline(r.min_loss_lr, color="0.4", linestyle=":", label=f"lowest loss: {r.min_loss_lr:.2e}")
    ax.set_xscale("log")
    if r.smoothed and min(r.smoothed) > 0:
        ax.set_yscale("log")
        top = max(r.smoothed[0], min(r.smoothed) * 4)
        ax.set_ylim(min(min(r.smoothed), min(r.losses)) * 0.8, top * 1.5)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Learning-rate range test: {r.optimizer}, {len(r.smoothed)} steps, stopped: {r.stopped}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def save_run_plot(history, path) -> None:
    """loss.png of one training run: train and validation loss on a log scale with the lr on its own (right,
    log) axis; validation accuracy in a second panel when the task has one."""
    plt = _pyplot()
    epochs = history.epochs
    has_acc = any(e.val_accuracy is not None for e in epochs)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for key, label, color in (("train_loss", "train loss", "C0"), ("val_loss", "validation loss", "C1")):
        pts = [(e.epoch, v) for e in epochs if (v := getattr(e, key)) is not None and math.isfinite(v) and v > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=color, label=label, marker="." if len(pts) < 30 else None)
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
    title = f"Training run: {len(epochs)} epochs, {history.status}"
    ax.set_title(title)
    if has_acc:
        acc = axes[0][1]
        pts = [(e.epoch, 100 * e.val_accuracy) for e in epochs if e.val_accuracy is not None]
        acc.plot(*zip(*pts, strict=True), color="C2", marker="." if len(pts) < 30 else None)
        acc.set_xlabel("epoch")
        acc.set_ylabel("validation accuracy (%)")
        acc.set_title("Validation accuracy")
        acc.grid(True, alpha=0.3)
    _margins(fig, left=1.0, right=0.8, wspace=0.45)  # room for the lr axis on the right
    _save(fig, path)


DYNAMICS = (
    ("grad_norm", "gradient norm ||g|| (RMS over steps)"),
    ("update_ratio", "update / weight ||Δw||/||w|| (one step)"),
    ("step_size", "effective step size ||Δw||/||g||"),
)


def save_dynamics_plot(c, path) -> None:
    """dynamics.png: one row per measure (gradient norm, update-to-weight ratio, effective step size), one column
    per layer, one line per optimizer (mean over seeds), log scale."""
    plt = _pyplot()
    layers = list(
        dict.fromkeys(layer for t in c.trials for e in t.history.epochs if e.dynamics for layer in e.dynamics["layers"])
    )
    fig, axes = plt.subplots(
        len(DYNAMICS), len(layers), figsize=(4.5 * len(layers) + 1, 3.2 * len(DYNAMICS)), squeeze=False
    )
    for row, (key, title) in enumerate(DYNAMICS):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for i, spec in enumerate(c.specs):
                per_epoch: dict[int, list[float]] = {}
                for t in c.trials:
                    if t.label != spec.label:
                        continue
                    for e in t.history.epochs:
                        v = (e.dynamics or {}).get("layers", {}).get(layer, {}).get(key)
                        if v is not None and v > 0:
                            per_epoch.setdefault(e.epoch, []).append(v)
                if per_epoch:
                    x = sorted(per_epoch)
                    ax.plot(x, [sum(per_epoch[k]) / len(per_epoch[k]) for k in x], color=f"C{i}", label=spec.label)
            ax.set_yscale("log")
            ax.set_title(f"{layer}: {title}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # nothing drawn when every trial had no dynamics
        axes[0][0].legend(fontsize=8)
    _margins(fig, left=0.7, wspace=0.25)
    _save(fig, path)


def save_trajectory_plot(c, z, path) -> None:
    """trajectories.png: the path each optimizer takes on a 2-D test function, drawn on its contour plot with
    log-spaced levels (of f minus its lowest value on the grid); one colour per optimizer, one line per seed;
    the start points marked by circles, the known minimum by a star."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    f = c.function
    values = np.asarray(z["z"], dtype=float)
    shifted = values - values.min() + 1e-6 * (np.ptp(values) or 1.0)  # > 0 for the log levels
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    levels = np.logspace(np.log10(shifted.min()), np.log10(shifted.max()), 30)
    ax.contourf(z["x"], z["y"], shifted, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.55)
    ax.contour(z["x"], z["y"], shifted, levels=levels, norm=LogNorm(), colors="0.35", linewidths=0.4)
    for i, spec in enumerate(c.specs):
        for k, t in enumerate(tr for tr in c.trials if tr.label == spec.label):
            start = f["starts"].get(t.seed, f["starts"].get(str(t.seed)))
            pts = [start] + [
                [e.position["x"], e.position["y"]]
                for e in t.history.epochs
                if e.position and e.position["x"] is not None and e.position["y"] is not None
            ]
            xs, ys = zip(*pts, strict=True)
            width = max(1.0, 2.8 - 0.5 * i)  # earlier optimizers wider, so a path drawn over another still shows
            ax.plot(xs, ys, color=f"C{i}", linewidth=width, alpha=0.9, label=spec.label if k == 0 else None)
            ax.plot(xs[-1:], ys[-1:], "x", color=f"C{i}", markersize=7)
    for start in f["starts"].values():
        ax.plot([start[0]], [start[1]], "o", color="black", markerfacecolor="white", markersize=7)
    ax.plot([f["minimum"][0]], [f["minimum"][1]], "*", color="gold", markeredgecolor="black", markersize=16)
    x0, x1, y0, y1 = f["box"]
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{f['name']}: {c.epochs} steps from ○ towards ★ {tuple(f['minimum'])}, {len(c.seeds)} seed(s); × end")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
