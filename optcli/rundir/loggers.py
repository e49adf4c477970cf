"""Where a run's metrics go besides its tables: train.loggers lists csv (metrics.csv and metrics.jsonl in the run
directory, written by runner.RunWriter) and tensorboard (event files through torch.utils.tensorboard).

TensorBoard tags: loss/train, loss/val, accuracy/val, lr per epoch; loss/train_step per step when
train.log_steps is set (read from the epoch's per-batch losses at its end, so the loop never syncs per step);
and per layer grad_norm/<layer>, update_ratio/<layer>, step_size/<layer> when train.dynamics is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from optcli.config import Config
from optcli.engine.loop import EpochMetrics, History
from optcli.errors import UserError

TENSORBOARD_DIR = "tensorboard"  # inside a run directory; a comparison has one subdirectory per trial


def summary_writer_class() -> Any:
    """torch.utils.tensorboard.SummaryWriter, or one clear line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "train.loggers: tensorboard needs optcli[tensorboard]: pip install 'optcli[tensorboard]'"
        ) from None
    return SummaryWriter


def check_loggers(cfg: Config) -> None:
    """Before any work: the packages the configured loggers need are importable."""
    if "tensorboard" in cfg.train.loggers:
        summary_writer_class()


def trial_dir_name(label: str, seed: int) -> str:
    """One directory per trial, so TensorBoard overlays optimizers and seeds; labels may hold ':' ',' '='."""
    safe = "".join(c if c.isalnum() or c in "._-=" else "_" for c in label)
    return f"{safe}-seed{seed}"


class TensorBoardLogger:
    """An epoch callback (train.EpochCallback) writing one run's scalars to `log_dir`."""

    def __init__(self, log_dir: Path, *, batch_size: int, n_train: int, log_steps: bool = False):
        self.writer = summary_writer_class()(log_dir=str(log_dir), flush_secs=2)
        self.batch_size, self.n_train, self.log_steps = batch_size, n_train, log_steps

    def epoch_end(self, metrics: EpochMetrics, step_losses: torch.Tensor | None) -> None:
        write_epoch(self.writer, metrics)
        if self.log_steps and step_losses is not None:
            sizes = torch.full((len(step_losses),), float(self.batch_size))
            sizes[-1] = self.n_train - self.batch_size * (len(step_losses) - 1)  # the last batch may be short
            per_sample = (step_losses.detach().cpu() / sizes).tolist()
            first = (metrics.epoch - 1) * len(step_losses) + 1
            for i, value in enumerate(per_sample):
                self.writer.add_scalar("loss/train_step", value, first + i)

    def close(self) -> None:
        self.writer.close()


def write_epoch(writer: Any, e: EpochMetrics) -> None:
    scalars: dict[str, float | None] = {
        "loss/train": e.train_loss,
        "loss/val": e.val_loss,
        "accuracy/val": e.val_accuracy,
        "lr": e.lr,
    }
    for layer, values in (e.dynamics or {}).get("layers", {}).items():
        for key in ("grad_norm", "update_ratio", "step_size"):
            scalars[f"{key}/{layer}"] = values.get(key)
    for tag, value in scalars.items():
        if value is not None:
            writer.add_scalar(tag, value, e.epoch)


def write_history(log_dir: Path, history: History) -> None:
    """A finished trial's per-epoch scalars as event files (comparisons write them once their trials are done,
    whichever process or machine ran them)."""
    writer = summary_writer_class()(log_dir=str(log_dir))
    try:
        for e in history.epochs:
            write_epoch(writer, e)
    finally:
        writer.close()


def make_loggers(cfg: Config, run_dir: Path, *, n_train: int) -> list[TensorBoardLogger]:
    """The epoch callbacks for a run directory (csv is written by the run directory's own writer)."""
    if "tensorboard" not in cfg.train.loggers:
        return []
    return [
        TensorBoardLogger(
            run_dir / TENSORBOARD_DIR, batch_size=cfg.data.batch_size, n_train=n_train, log_steps=cfg.train.log_steps
        )
    ]
