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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from optcli.config import Config, EarlyStoppingConfig
from optcli.engine.distributed import SINGLE, Dist
from optcli.engine.optimizers import current_lr, is_plateau, needs_closure, scheduler_interval, step_with_closure
from optcli.engine.stepping import set_mode
from optcli.errors import UserError
from optcli.tasks import Data, Split, batches, epoch_permutation, steps_per_epoch
from optcli.tasks.functions import FunctionValue

LossFn = nn.CrossEntropyLoss | nn.MSELoss | FunctionValue
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


PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The forward pass under torch.autocast for bf16 and 16 (matmuls in the low precision, reductions such as
    the loss in float32); float32 runs as it is."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=PRECISION_DTYPES[precision])


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


def make_loss(cfg: Config, dist: Dist = SINGLE) -> LossFn:
    if cfg.train.loss == "value":  # a 2-D test function: the model's output is the loss
        return FunctionValue(reduction=cfg.train.reduction)
    cls = nn.CrossEntropyLoss if cfg.train.loss == "cross_entropy" else nn.MSELoss
    return cls(reduction="sum" if dist.enabled else cfg.train.reduction)


def _sample_sum(loss: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    """The loss summed over samples, so epoch averages are true averages, not means of batch means."""
    return loss * n if reduction == "mean" else loss


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    split: Split,
    *,
    batch_size: int,
    perm: torch.Tensor,
    accumulate: int = 1,
    grad_clip: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    dist: Dist = SINGLE,
    reduction: str | None = None,
    step_scheduler: Callable[[], object] | None = None,
    precision: str = "32",
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One pass over `split` in the order `perm`; returns each batch's loss summed over its samples (on device).
    Under torchrun each rank runs its shard of every batch with a summed loss, and `reduction` is the
    configured one (see `loss_weight`). `step_scheduler` is called after every optimizer step (per-step
    schedules such as OneCycleLR); `precision` and `scaler` are train.precision's autocast and GradScaler."""
    reduction = reduction or loss_fn.reduction
    device_type = split.x.device.type
    scaler = scaler or grad_scaler(precision, split.x.device)
    model.train()
    set_mode(optimizer, training=True)  # schedule-free optimizers switch with the model
    n_batches = math.ceil(len(split) / batch_size)
    losses = torch.zeros(n_batches, device=split.x.device)
    use_closure = needs_closure(optimizer)
    # with reduction="mean", k accumulated batches step like one batch k times larger; with "sum" they add up as is
    scale = 1.0 / accumulate if reduction == "mean" else 1.0
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches(split, batch_size, perm)):
        x, y, n_global = dist.shard(x), dist.shard(y), len(x)
        if use_closure:  # LBFGS re-evaluates the loss several times per step

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                with autocast(precision, device_type):
                    loss = loss_fn(model(x), y)
                loss.backward()
                if grad_clip is not None:  # every gradient the optimizer reads is the clipped one
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
                return loss

            loss = step_with_closure(optimizer, closure)
            if step_scheduler is not None:
                step_scheduler()
        else:
            with autocast(precision, device_type):
                loss = loss_fn(model(x), y)
            scaler.scale(loss * scale * loss_weight(dist, n_global, reduction)).backward()
            if (i + 1) % accumulate == 0 or i + 1 == n_batches:
                if grad_clip is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if step_scheduler is not None:
                    step_scheduler()
        losses[i] = _sample_sum(loss.detach(), len(x), loss_fn.reduction)
        if on_batch is not None:
            on_batch(i + 1, n_batches)
    return dist.all_reduce_sum(losses)


def check_closure_settings(optimizer_cls: type, accumulate: int, where: str = "optimizer") -> None:
    """Optimizers that re-evaluate the loss in step() (LBFGS) take one step per batch: gradient accumulation
    cannot apply to them, so it is refused rather than silently ignored (grad_clip applies inside the closure)."""
    if accumulate > 1 and needs_closure(optimizer_cls):
        raise UserError(
            f"train.accumulate: {optimizer_cls.__name__} ({where}) re-evaluates the loss in step() and steps once "
            f"per batch; set train.accumulate=1 and raise data.batch_size instead"
        )


def loss_weight(dist: Dist, n_global: int, reduction: str) -> float:
    """Under DDP each rank's loss is summed over its shard (make_loss), and DDP averages gradients over ranks:
    scaling by world / global batch (or by world, for "sum") gives exactly the gradient of the global batch,
    even when the last batch splits unevenly."""
    if not dist.enabled:
        return 1.0
    return dist.world / n_global if reduction == "mean" else float(dist.world)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, split: Split, *, dist: Dist = SINGLE, precision: str = "32"
) -> tuple[float, float | None]:
    """(average loss, accuracy) over `split`; accuracy is None for regression. Each rank evaluates its shard."""
    model.eval()
    x_all, y_all = dist.shard(split.x), dist.shard(split.y)
    sums = torch.zeros(2, device=split.x.device)  # loss summed over samples, correct predictions
    classify = split.y.dtype == torch.long
    for start in range(0, len(x_all), EVAL_BATCH):
        x, y = x_all[start : start + EVAL_BATCH], y_all[start : start + EVAL_BATCH]
        with autocast(precision, split.x.device.type):
            out = model(x)
            sums[0] += _sample_sum(loss_fn(out, y), len(x), loss_fn.reduction)
        if classify:
            sums[1] += (out.argmax(dim=1) == y).sum()
    total, correct = dist.all_reduce_sum(sums).tolist()
    return total / len(split), (correct / len(split) if classify else None)


def fit(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data: Data,
    *,
    history: History | None = None,
    on_epoch: Callable[[History], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    train_model: nn.Module | None = None,
    dist: Dist = SINGLE,
    callbacks: Sequence[EpochCallback] = (),
    scaler: torch.amp.GradScaler | None = None,
) -> History:
    """Train from the epoch after the last one in `history` to cfg.train.epochs, or until early stopping ends it.
    `train_model` is the module run forward in training (a DDP or torch.compile wrapper of `model`), `model` the
    one evaluated and saved; `scaler` the run's GradScaler when its state is checkpointed (one is made otherwise)."""
    history = history or History()
    train_model = train_model or model
    loss_fn = make_loss(cfg, dist)
    device = data.train.x.device
    per_step = scheduler is not None and scheduler_interval(cfg.scheduler) == "step"
    closure = needs_closure(optimizer)
    epoch_steps = steps_per_epoch(len(data.train), cfg.data.batch_size, 1 if closure else cfg.train.accumulate)
    precision = cfg.train.precision
    scaler = scaler or grad_scaler(precision, device)
    rule = cfg.train.early_stopping
    stop = early_stop(history, rule) if rule else None  # a resumed run that had stopped early stays stopped
    for epoch in range(len(history.epochs) + 1, cfg.train.epochs + 1):
        if stop is not None:
            break
        t0 = time.perf_counter()
        lr = current_lr(optimizer)
        previous = history.epochs[-1] if history.epochs else None
        perm = epoch_permutation(len(data.train), cfg.seed, epoch, device)
        batch_cb = functools.partial(on_batch, epoch) if on_batch else None
        losses = train_one_epoch(
            train_model,
            optimizer,
            loss_fn,
            data.train,
            batch_size=cfg.data.batch_size,
            perm=perm,
            accumulate=cfg.train.accumulate,
            grad_clip=cfg.train.grad_clip,
            on_batch=batch_cb,
            dist=dist,
            reduction=cfg.train.reduction,
            step_scheduler=scheduler.step if per_step else None,
            precision=precision,
            scaler=scaler,
        )
        set_mode(optimizer, training=False)  # before evaluation and before the checkpoint (on_epoch)
        finite = torch.isfinite(losses)
        bad_step = None if bool(finite.all()) else int((~finite).nonzero()[0]) + 1
        train_end = time.perf_counter()  # after the host sync above, so queued device work is counted
        val_loss, val_acc = (
            evaluate(model, loss_fn, data.val, dist=dist, precision=precision)
            if data.val is not None and bad_step is None
            else (None, None)
        )
        train_loss = losses.sum().item() / len(data.train)
        if bad_step is None and val_loss is not None and not math.isfinite(val_loss):
            bad_step = len(losses)
        if scheduler is not None and bad_step is None and not per_step:
            scheduler.step(val_loss if val_loss is not None else train_loss) if is_plateau(
                scheduler
            ) else scheduler.step()
        metrics = EpochMetrics(
            epoch,
            train_loss,
            val_loss,
            val_acc,
            lr,
            time.perf_counter() - t0,
            steps=(previous.steps if previous else 0) + epoch_steps,
            train_seconds=(previous.train_seconds if previous else 0.0) + train_end - t0,
        )
        for callback in callbacks:
            callback.epoch_end(metrics, losses)
        history.epochs.append(metrics)
        if bad_step is not None:
            history.status, history.diverged_at = "diverged", {"epoch": epoch, "step": bad_step}
        stop = early_stop(history, rule) if rule and bad_step is None else None
        if stop is not None:
            history.status, history.stopped_early = "stopped_early", stop
        if on_epoch is not None:
            on_epoch(history)
        if history.status == "diverged":
            return history
    history.status = "completed" if stop is None else "stopped_early"
    history.stopped_early = stop
    if data.test is not None:
        history.test_loss, history.test_accuracy = evaluate(model, loss_fn, data.test, dist=dist, precision=precision)
    return history
