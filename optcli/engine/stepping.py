"""How a batch becomes an optimizer step: the step kinds (plain, float16 with a GradScaler, through a closure),
autocast, gradient accumulation and clipping, and what an optimizer needs beyond zero_grad(), backward() and
step(): closures, and train/eval modes.

Closure optimizers. An optimizer is driven through a closure when its step() cannot run without one:
- its `closure` parameter has no default (torch's LBFGS): step(closure) evaluates the loss itself, as often
  as it needs, and is called without computing a gradient first;
- or its step() refuses to run without one before it reads any state (pytorch-optimizer's SAM family and AliG,
  which raise NoClosureError): these want the gradient at the current weights already in `.grad`, then
  step(closure) re-evaluates the loss and gradient elsewhere (at perturbed weights, twice per step for BSAM).
  optcli computes the gradient first, then steps.
Both are read from the class alone, so every process and every moment gives the same answer.

Modes. Schedule-free optimizers keep two sequences of weights and show the model a different one for training
and for evaluation: they have train() and eval() methods, called at the same moments as model.train() and
model.eval() (`set_mode`), so checkpoints are written in eval mode.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from optcli.config import Config
from optcli.engine.distributed import SINGLE, Dist


class Loss(Protocol):
    """A loss module: called on (output, target), with the reduction it applies over a batch."""

    reduction: str

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def _cls(optimizer: Any) -> type:
    return optimizer if isinstance(optimizer, type) else type(optimizer)


def closure_in_signature(optimizer: Any) -> bool:
    """LBFGS-style: step()'s closure has no default."""
    step = getattr(_cls(optimizer), "step", None)
    closure = inspect.signature(step).parameters.get("closure") if step is not None else None
    return closure is not None and closure.default is inspect.Parameter.empty


@functools.cache
def refuses_plain_step(cls: type) -> bool:
    """SAM-style: step() without a closure raises before it reads any state. Asked of an instance that holds one
    parameter without a gradient and none of the class's own settings (its __init__ is not run, so no keyword is
    needed and nothing is allocated or drawn): the refusal names the closure; any other error, or none, means
    the plain step is the class's own business."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return False
    try:
        bare = cls.__new__(cls)
        torch.optim.Optimizer.__init__(bare, [torch.zeros(1, requires_grad=True)], {})
        with torch.random.fork_rng(devices=[]):
            cls.step(bare)
    except Exception as exc:  # whatever a half-built optimizer raises: only a refusal that names the closure counts
        return "closure" in str(exc).lower()
    return False


def needs_closure(optimizer: Any) -> bool:
    cls = _cls(optimizer)
    return closure_in_signature(cls) or refuses_plain_step(cls)


def gradient_before_closure(optimizer: Any) -> bool:
    """SAM-style: step(closure) expects the gradient at the current weights in `.grad` already."""
    cls = _cls(optimizer)
    return not closure_in_signature(cls) and refuses_plain_step(cls)


def step_with_closure(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One step of a closure optimizer; returns the loss at the weights before the step. torch types the
    closure as returning a float, but step() hands back whatever the closure returned (or None, for SAM)."""
    if gradient_before_closure(optimizer):
        loss = closure()
        optimizer.step(cast(Callable[[], float], closure))
        return loss
    return cast(torch.Tensor, optimizer.step(cast(Callable[[], float], closure)))


def has_modes(optimizer: Any) -> bool:
    """Schedule-free optimizers (schedulefree, pytorch-optimizer's ScheduleFree*) have train() and eval()."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def set_mode(optimizer: Any, *, training: bool) -> None:
    """optimizer.train() or optimizer.eval() where the optimizer has modes; nothing otherwise."""
    if has_modes(optimizer):
        optimizer.train() if training else optimizer.eval()


def optimizer_mode(optimizer: Any) -> str | None:
    """'train' or 'eval' for an optimizer with modes (both packages keep it as `train_mode`), None otherwise."""
    if not has_modes(optimizer):
        return None
    flag = getattr(optimizer, "train_mode", None)
    if flag is None and optimizer.param_groups:
        flag = optimizer.param_groups[0].get("train_mode")
    return None if flag is None else ("train" if flag else "eval")


PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The forward pass under torch.autocast for bf16 and 16 (matmuls in the low precision, reductions such as
    the loss in float32); float32 runs as it is."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=PRECISION_DTYPES[precision])


def sample_sum(loss: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    """The loss summed over samples, so epoch averages are true averages, not means of batch means."""
    return loss * n if reduction == "mean" else loss


def loss_weight(dist: Dist, n_global: int, reduction: str) -> float:
    """Under DDP each rank's loss is summed over its shard (make_loss), and DDP averages gradients over ranks:
    scaling by world / global batch (or by world, for "sum") gives exactly the gradient of the global batch,
    even when the last batch splits unevenly."""
    if not dist.enabled:
        return 1.0
    return dist.world / n_global if reduction == "mean" else float(dist.world)


def gradient_sync(model: nn.Module, *, sync: bool) -> AbstractContextManager:
    """DDP all-reduces the gradients in every backward(); between the micro-batches of an accumulated step they only
    add up locally, so all but the step's last run under no_sync() (forward included, as DDP requires) and the last
    backward all-reduces the sum once. A torch.compile wrapper is looked through to the DDP module it holds."""
    inner = getattr(model, "_orig_mod", model)
    if sync or not isinstance(inner, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return inner.no_sync()


@dataclass(frozen=True)
class StepSettings:
    """How batches become optimizer steps (train.*), the same for every epoch of a run."""

    accumulate: int = 1  # batches per optimizer step; their gradients add up in between
    grad_clip: float | None = None  # the global gradient norm is clipped to this before each step
    reduction: str = "mean"  # train.reduction; under torchrun each rank's loss is a sum (see loss_weight)
    precision: str = "32"  # train.precision: the forward pass under autocast
    dist: Dist = SINGLE

    @classmethod
    def of(cls, cfg: Config, dist: Dist = SINGLE) -> StepSettings:
        t = cfg.train
        return cls(
            accumulate=t.accumulate, grad_clip=t.grad_clip, reduction=t.reduction, precision=t.precision, dist=dist
        )


class PlainStep:
    """The textbook step: forward, backward, and at the last batch of every `accumulate` batches (clip,) step and
    zero_grad. Called with one batch, it returns that batch's loss summed over its samples (on the device)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss, settings: StepSettings):
        self.model, self.optimizer, self.loss_fn, self.settings = model, optimizer, loss_fn, settings
        self.accumulate = settings.accumulate
        # with reduction="mean", k accumulated batches step like one batch k times larger; with "sum" they add up
        self.scale = 1.0 / settings.accumulate if settings.reduction == "mean" else 1.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        s = self.settings
        x, y, n_global = s.dist.shard(x), s.dist.shard(y), len(x)
        with gradient_sync(self.model, sync=last):
            with autocast(s.precision, x.device.type):
                loss = self.loss_fn(self.model(x), y)
            self.backward(loss * self.scale * loss_weight(s.dist, n_global, s.reduction))
        if last:
            self.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sample_sum(loss.detach(), len(x), self.loss_fn.reduction)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip, foreach=True)
        self.optimizer.step()


class ScaledStep(PlainStep):
    """float16: the loss scaled up before backward() so that small gradients do not underflow, the gradients
    unscaled before clipping and stepping (a step whose gradients overflowed is skipped, and the scale lowered)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Loss,
        settings: StepSettings,
        scaler: torch.amp.GradScaler,
    ):
        super().__init__(model, optimizer, loss_fn, settings)
        self.scaler = scaler

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()


class ClosureStep(PlainStep):
    """Optimizers that re-evaluate the loss in step() (LBFGS, SAM): one step per batch, through a closure that
    computes the loss and its (clipped) gradient wherever the optimizer asks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss, settings: StepSettings):
        super().__init__(model, optimizer, loss_fn, settings)
        self.accumulate = 1  # check_closure_settings refuses more

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        s = self.settings
        x, y, n_global = s.dist.shard(x), s.dist.shard(y), len(x)
        weight = loss_weight(s.dist, n_global, s.reduction)
        first: list[torch.Tensor] = []  # this rank's loss at the weights before the step, for the epoch's sums

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(s.precision, x.device.type):
                loss = self.loss_fn(self.model(x), y)
            (loss * weight).backward()
            if s.grad_clip is not None:  # every gradient the optimizer reads is the clipped one
                nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip, foreach=True)
            if not first:
                first.append(loss.detach())
            if not s.dist.enabled:
                return loss
            # the global batch's loss on every rank: LBFGS's line search and stopping tests read it, and ranks
            # that saw different values would take different steps
            return s.dist.all_reduce_sum((loss * weight).detach()) / s.dist.world

        step_with_closure(self.optimizer, closure)
        return sample_sum(first[0], len(x), self.loss_fn.reduction)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    settings: StepSettings,
    scaler: torch.amp.GradScaler | None = None,
) -> PlainStep:
    """The step this optimizer and precision need: through a closure, with a GradScaler (float16), or plain."""
    if needs_closure(optimizer):
        return ClosureStep(model, optimizer, loss_fn, settings)
    if scaler is not None and scaler.is_enabled():
        return ScaledStep(model, optimizer, loss_fn, settings, scaler)
    return PlainStep(model, optimizer, loss_fn, settings)
