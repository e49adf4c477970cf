"""The training loop: train_one_epoch, evaluate, fit -> History. Nothing here prints.

The step is the textbook one: model.train(), zero_grad(), forward, loss.backward(), optimizer.step();
evaluation under model.eval() and torch.no_grad(). Losses stay on the device during an epoch and are
read back once at its end, so the loop never waits on a host sync per step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from optcli.config import Config, EarlyStoppingConfig
from optcli.engine.distributed import SINGLE, Dist
from optcli.engine.losses import build_loss
from optcli.engine.optimizers import current_lr, is_plateau, needs_closure, scheduler_interval
from optcli.engine.stepping import (
    PRECISION_DTYPES,
    Loss,
    PlainStep,
    StepSettings,
    autocast,
    make_step,
    sample_sum,
    set_mode,
)
from optcli.errors import UserError
from optcli.rundir import signals
from optcli.tasks import Data, Split, batches, epoch_permutation, steps_per_epoch
from optcli.tasks.base import is_real_valued, r2_score

EVAL_BATCH = 8192  # evaluation needs no gradients, so large batches are cheap and fast


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float  # the configured loss, averaged over the epoch's samples
    val_loss: float | None
    val_accuracy: float | None
    lr: float  # the learning rate at the epoch's first step (first param group)
    seconds: float  # the whole epoch, evaluation included
    steps: int = 0  # optimizer steps taken since the start of the run, this epoch's included
    train_seconds: float = 0.0  # training time since the start of the run, evaluation excluded
    dynamics: dict | None = None  # per layer: gradient norm, update-to-weight ratio, step size (dynamics.py)
    position: dict | None = None  # 2-D test functions: x, y, f(x, y), distance to the minimum after the epoch
    val_r2: float | None = None  # regression: R² on the validation split (higher is better)

    def csv_row(self) -> dict:
        """The flat columns of metrics.csv; the nested dynamics and position go to metrics.jsonl only."""
        return {k: v for k, v in vars(self).items() if k not in ("dynamics", "position")}


FINISHED = ("completed", "stopped_early")  # statuses of a run that trained to its end, planned or early


@dataclass
class History:
    epochs: list[EpochMetrics] = field(default_factory=list)
    status: str = "running"  # completed | stopped_early | diverged | interrupted | failed
    diverged_at: dict | None = None  # {"epoch": e, "step": s} of the first non-finite loss
    test_loss: float | None = None
    test_accuracy: float | None = None
    error: str | None = None  # why a trial failed (its task raised or was lost, after one retry)
    stopped_early: dict | None = None  # {"epoch", "best_epoch", "metric", "best"} when early stopping ended the run

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(**{**d, "epochs": [EpochMetrics(**e) for e in d["epochs"]]})

    def next_epoch(
        self,
        *,
        epoch: int,
        losses: tuple[float, float | None, float | None, float | None],
        lr: float,
        seconds: float,
        steps: int,
        train_seconds: float,
    ) -> EpochMetrics:
        """This epoch's metrics: `losses` is (train loss, val loss, val accuracy, val R²); `steps` and
        `train_seconds` are the epoch's own, added to the run's totals so far."""
        previous = self.epochs[-1] if self.epochs else None
        return EpochMetrics(
            epoch=epoch,
            train_loss=losses[0],
            val_loss=losses[1],
            val_accuracy=losses[2],
            val_r2=losses[3],
            lr=lr,
            seconds=seconds,
            steps=(previous.steps if previous else 0) + steps,
            train_seconds=(previous.train_seconds if previous else 0.0) + train_seconds,
        )

    def set_status(self, *, diverged_at: dict | None = None, stop: dict | None = None, done: bool = False) -> None:
        """The one place training changes the status: diverged (at {"epoch", "step"}), stopped early (`stop`, see
        early_stop), completed once the planned epochs are done; left as it is otherwise."""
        if diverged_at is not None:
            self.status, self.diverged_at = "diverged", diverged_at
        elif stop is not None:
            self.status, self.stopped_early = "stopped_early", stop
        elif done:
            self.status, self.stopped_early = "completed", None

    def best(self) -> EpochMetrics | None:
        """The epoch with the lowest validation loss (train loss when there is no validation split)."""
        finite = [e for e in self.epochs if math.isfinite(_score(e))]
        return min(finite, key=_score) if finite else None


class EpochCallback(Protocol):
    """Called by fit after each epoch, before the epoch joins the history: loggers and measurements.
    `step_losses` holds each batch's loss summed over its samples, on the device."""

    def epoch_end(self, metrics: EpochMetrics, step_losses: torch.Tensor) -> None: ...

    def close(self) -> None: ...


def _score(e: EpochMetrics) -> float:
    return e.val_loss if e.val_loss is not None else e.train_loss


def check_precision(precision: str, device: torch.device, *, uses_closure: bool = False) -> None:
    """Refuse, before training, a precision the device cannot run: one tiny forward and backward under autocast,
    whose output must come out in the asked dtype (torch warns and falls back to float32 where it cannot)."""
    if precision == "32":
        return
    if precision == "16" and uses_closure:
        raise UserError(
            "train.precision: 16 needs a GradScaler, which cannot step optimizers that re-evaluate the "
            "loss in step() (LBFGS); use bf16 or 32"
        )
    layer = nn.Linear(4, 4).to(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with autocast(precision, device.type):
                out = layer(torch.ones(2, 4, device=device))
            out.float().sum().backward()
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"train.precision: {precision} does not run on {device} ({str(exc).splitlines()[0][:160]})"
        ) from None
    if out.dtype != PRECISION_DTYPES[precision]:
        raise UserError(f"train.precision: autocast on {device} does not support {PRECISION_DTYPES[precision]}; use 32")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """float16 gradients underflow without loss scaling; with any other precision the scaler is a pass-through
    (scale() returns the loss, step() calls optimizer.step()), so the loop has one shape for all."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16")


def early_stop(history: History, rule: EarlyStoppingConfig) -> dict | None:
    """Whether `rule` stops training after the last epoch of `history`. Decided from the history alone, so a
    resumed run stops exactly where the uninterrupted one would. An improvement beats the best so far by more
    than min_delta; `patience` epochs without one stop the run (a non-finite value is no improvement)."""
    best, best_epoch, wait = None, None, 0
    sign = -1.0 if rule.maximize else 1.0
    for e in history.epochs:
        value = getattr(e, rule.metric)
        if value is not None and math.isfinite(value) and (best is None or sign * (value - best) < -rule.min_delta):
            best, best_epoch, wait = value, e.epoch, 0
        else:
            wait += 1
    if wait < rule.patience or not history.epochs:
        return None
    return {"epoch": history.epochs[-1].epoch, "best_epoch": best_epoch, "metric": rule.metric, "best": best}


def make_loss(cfg: Config, dist: Dist = SINGLE) -> Loss:
    """train.loss (or the task's own), summed over samples on the ranks of a torchrun job (see loss_weight)."""
    return build_loss(cfg, "sum" if dist.enabled else cfg.train.reduction)


def train_one_epoch(
    step: PlainStep,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    n_batches: int,
    on_batch: Callable[[int, int], None] | None = None,
    on_step: Callable[[], object] | None = None,
) -> torch.Tensor:
    """One pass over `batches`; returns each batch's loss summed over its samples, on the device (a row per seed
    for stacked seeds). `on_step` is called after every optimizer step (per-step schedules such as OneCycleLR)."""
    step.model.train()
    set_mode(step.optimizer, training=True)  # schedule-free optimizers switch with the model
    step.optimizer.zero_grad(set_to_none=True)
    losses = []
    batch_iter = iter(batches)
    # closed on any exit (a generator's close()): a streamed split's DataLoader ends its workers now, not at exit
    with contextlib.closing(batch_iter) if isinstance(batch_iter, Generator) else contextlib.nullcontext():
        for i, (x, y) in enumerate(batch_iter):
            signals.raise_if_lost()
            last = (i + 1) % step.accumulate == 0 or i + 1 == n_batches
            losses.append(step(x, y, last=last))
            if last and on_step is not None:
                on_step()
            if on_batch is not None:
                on_batch(i + 1, n_batches)
    return step.settings.dist.all_reduce_sum(torch.stack(losses, dim=-1).float())


def divergence(losses: torch.Tensor, val_loss: float | None) -> int | None:
    """The step (1-based) of the epoch's first non-finite loss, the epoch's last when only the validation loss is
    non-finite, None when the epoch stayed finite."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        return int((~finite).nonzero()[0]) + 1
    if val_loss is not None and not math.isfinite(val_loss):
        return len(losses)
    return None


def check_closure_settings(optimizer_cls: type, accumulate: int, where: str = "optimizer") -> None:
    """Optimizers that re-evaluate the loss in step() (LBFGS) take one step per batch: gradient accumulation
    cannot apply to them, so it is refused rather than silently ignored (grad_clip applies inside the closure)."""
    if accumulate > 1 and needs_closure(optimizer_cls):
        raise UserError(
            f"train.accumulate: {optimizer_cls.__name__} ({where}) re-evaluates the loss in step() and steps once "
            f"per batch; set train.accumulate=1 and raise data.batch_size instead"
        )


def eval_width(split: Split) -> int:
    """The sums add_eval_batch keeps: the loss, correct predictions, and for real-valued targets the squared error
    of each output (for R²)."""
    return 2 + (split.y.shape[1] if is_real_valued(split.y) else 0)


def add_eval_batch(sums: torch.Tensor, out: torch.Tensor, y: torch.Tensor, loss_fn: Loss) -> None:
    """Adds one chunk's loss summed over its samples to sums[0], for classification its correct predictions to
    sums[1], for real-valued targets each output's summed squared error to sums[2:]."""
    sums[0] += sample_sum(loss_fn(out, y), len(y), loss_fn.reduction)
    if y.dtype == torch.long:
        sums[1] += (out.argmax(dim=1) == y).sum()
    elif len(sums) > 2 and out.shape == y.shape:
        sums[2:] += (out.float() - y).square().sum(dim=0)


def averages(sums: list[float], split: Split) -> tuple[float, float | None, float | None]:
    """(average loss, accuracy, R²) from add_eval_batch's sums over `split`; accuracy only for class labels, R²
    only for real-valued targets."""
    total, correct = sums[:2]
    accuracy = correct / len(split) if split.y.dtype == torch.long else None
    r2 = r2_score(torch.tensor(sums[2:]), split.y) if len(sums) > 2 else None
    return total / len(split), accuracy, r2


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: Loss, split: Split, *, dist: Dist = SINGLE, precision: str = "32"
) -> tuple[float, float | None, float | None]:
    """(average loss, accuracy, R²) over `split` (see averages). Each rank evaluates its shard."""
    model.eval()
    x_all, y_all = dist.shard(split.x), dist.shard(split.y)
    sums = torch.zeros(eval_width(split), device=split.x.device)
    for start in range(0, len(x_all), EVAL_BATCH):
        x, y = x_all[start : start + EVAL_BATCH], y_all[start : start + EVAL_BATCH]
        with autocast(precision, split.x.device.type):
            add_eval_batch(sums, model(x), y, loss_fn)
    return averages(dist.all_reduce_sum(sums).tolist(), split)


@dataclass(frozen=True)
class Training:
    """What fit trains: the config, the model (evaluated and saved), its optimizer and scheduler, and the data."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Data
    train_model: nn.Module | None = None  # the module run forward in training: a DDP or torch.compile wrapper
    dist: Dist = SINGLE
    scaler: torch.amp.GradScaler | None = None  # the run's GradScaler when its state is checkpointed

    def step(self, loss_fn: Loss) -> PlainStep:
        scaler = self.scaler or grad_scaler(self.cfg.train.precision, self.data.train.x.device)
        settings = StepSettings.of(self.cfg, self.dist)
        return make_step(self.train_model or self.model, self.optimizer, loss_fn, settings, scaler)

    @property
    def per_step_scheduler(self) -> bool:
        return self.scheduler is not None and scheduler_interval(self.cfg.scheduler) == "step"


def fit(
    run: Training,
    *,
    history: History | None = None,
    on_epoch: Callable[[History], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    callbacks: Sequence[EpochCallback] = (),
) -> History:
    """Train from the epoch after the last one in `history` to cfg.train.epochs, or until early stopping ends it."""
    history = history or History()
    loss_fn = make_loss(run.cfg, run.dist)
    step = run.step(loss_fn)
    rule = run.cfg.train.early_stopping
    stop = early_stop(history, rule) if rule else None  # a resumed run that had stopped early stays stopped
    for epoch in range(len(history.epochs) + 1, run.cfg.train.epochs + 1):
        if stop is not None:
            break
        batch_cb = functools.partial(on_batch, epoch) if on_batch else None
        metrics, losses, bad_step = _epoch(run, step, epoch, history, on_batch=batch_cb)
        for callback in callbacks:
            callback.epoch_end(metrics, losses)
        history.epochs.append(metrics)
        stop = early_stop(history, rule) if rule and bad_step is None else None
        history.set_status(diverged_at=None if bad_step is None else {"epoch": epoch, "step": bad_step}, stop=stop)
        if on_epoch is not None:
            on_epoch(history)
        if bad_step is not None:
            return history
    history.set_status(stop=stop, done=True)
    if run.data.test is not None:
        precision = run.cfg.train.precision
        history.test_loss, history.test_accuracy, _ = evaluate(
            run.model, loss_fn, run.data.test, dist=run.dist, precision=precision
        )
    return history


def _epoch(
    run: Training, step: PlainStep, epoch: int, history: History, *, on_batch: Callable[[int, int], None] | None
) -> tuple[EpochMetrics, torch.Tensor, int | None]:
    """One epoch of training and its evaluation: (metrics, each batch's loss sum, the divergence step or None)."""
    cfg, data, t0 = run.cfg, run.data, time.perf_counter()
    lr = current_lr(run.optimizer)
    perm = epoch_permutation(len(data.train), cfg.seed, epoch, data.train.x.device)
    losses = train_one_epoch(
        step,
        batches(data.train, cfg.data.batch_size, perm),
        n_batches=math.ceil(len(data.train) / cfg.data.batch_size),
        on_batch=on_batch,
        on_step=run.scheduler.step if run.per_step_scheduler else None,
    )
    set_mode(run.optimizer, training=False)  # before evaluation and before the checkpoint (on_epoch)
    finite = bool(torch.isfinite(losses).all())
    train_end = time.perf_counter()  # after the host sync above, so queued device work is counted
    val_loss, val_acc, val_r2 = (
        evaluate(run.model, step.loss_fn, data.val, dist=run.dist, precision=cfg.train.precision)
        if data.val is not None and finite
        else (None, None, None)
    )
    train_loss = losses.sum().item() / len(data.train)
    bad_step = divergence(losses, val_loss)
    if run.scheduler is not None and bad_step is None and not run.per_step_scheduler:
        scheduler = run.scheduler
        scheduler.step(val_loss if val_loss is not None else train_loss) if is_plateau(scheduler) else scheduler.step()
    metrics = history.next_epoch(
        epoch=epoch,
        losses=(train_loss, val_loss, val_acc, val_r2),
        lr=lr,
        seconds=time.perf_counter() - t0,
        steps=steps_per_epoch(len(data.train), cfg.data.batch_size, step.accumulate),
        train_seconds=train_end - t0,
    )
    return metrics, losses, bad_step
