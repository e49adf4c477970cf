"""Plots written next to a run's files (matplotlib, headless)."""

from __future__ import annotations


def save_loss_plot(c, path) -> None:
    """loss.png: mean loss per optimizer with the seed spread (min to max over seeds) as a band, log scale;
    train and validation side by side."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optcli.runs import atomic_write_bytes

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
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
