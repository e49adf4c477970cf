"""How an optimizer is driven beyond zero_grad(), backward() and step(): closures, and train/eval modes.

Closure optimizers. An optimizer is driven through a closure when its step() cannot run without one:
- its `closure` parameter has no default (torch's LBFGS): step(closure) evaluates the loss itself, as often
  as it needs, and is called without computing a gradient first;
- or its trial step (optim.check_optimizer, on a tiny model, after backward() like any other optimizer) raises
  when called without a closure (pytorch-optimizer's SAM family, which raise NoClosureError): these want the
  gradient at the current weights already in `.grad`, then step(closure) re-evaluates the loss and gradient
  elsewhere (at perturbed weights, twice per step for BSAM). optcli computes the gradient first, then steps.
The trial step's verdict is kept per class for the process (`record_trial_step`).

Modes. Schedule-free optimizers keep two sequences of weights and show the model a different one for training
and for evaluation: they have train() and eval() methods, called at the same moments as model.train() and
model.eval() (`set_mode`), so checkpoints are written in eval mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

import torch

_refuses_plain_step: dict[type, bool] = {}  # class -> its trial step raised without a closure


def _cls(optimizer: Any) -> type:
    return optimizer if isinstance(optimizer, type) else type(optimizer)


def closure_in_signature(optimizer: Any) -> bool:
    """LBFGS-style: step()'s closure has no default."""
    step = getattr(_cls(optimizer), "step", None)
    closure = inspect.signature(step).parameters.get("closure") if step is not None else None
    return closure is not None and closure.default is inspect.Parameter.empty


def record_trial_step(cls: type, *, refused_without_closure: bool) -> None:
    _refuses_plain_step[cls] = refused_without_closure


def trial_step_known(cls: type) -> bool:
    return cls in _refuses_plain_step or closure_in_signature(cls)


def needs_closure(optimizer: Any) -> bool:
    cls = _cls(optimizer)
    return closure_in_signature(cls) or _refuses_plain_step.get(cls, False)


def gradient_before_closure(optimizer: Any) -> bool:
    """SAM-style: step(closure) expects the gradient at the current weights in `.grad` already."""
    cls = _cls(optimizer)
    return not closure_in_signature(cls) and _refuses_plain_step.get(cls, False)


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
