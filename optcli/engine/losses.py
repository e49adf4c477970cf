"""The loss of a run: train.loss by name, or the task's own when it is unset.

Short names: mse and cross_entropy (torch.nn.functional's mse_loss and cross_entropy) and a task's own losses
(value, a 2-D function's value). Any other name is a loss of torch.nn.functional, one that takes `reduction`
(huber_loss, smooth_l1_loss, binary_cross_entropy_with_logits, ...), with train.loss_kwargs checked against its
signature. No hand-written list: the losses are read from torch.nn.functional by introspection.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optcli.config import Config
from optcli.engine.stepping import Loss
from optcli.errors import UserError
from optcli.tasks.registry import get_task

SHORT_NAMES = {"mse": "mse_loss", "cross_entropy": "cross_entropy"}
NOT_KEYWORDS = ("input", "target", "reduction", "size_average", "reduce")  # given by optcli, or deprecated


def functional_losses() -> dict[str, Callable[..., torch.Tensor]]:
    """torch.nn.functional's losses: its public functions with a `reduction` argument."""
    found = {}
    for name, fn in vars(F).items():
        if name.startswith("_") or not callable(fn):
            continue
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        if "reduction" in params:
            found[name] = fn
    return found


class FunctionalLoss(nn.Module):
    """A torch.nn.functional loss as a module with `reduction`, as nn.MSELoss is for F.mse_loss. Lists among the
    keywords (cross_entropy's weight, ...) become tensors on the output's device."""

    def __init__(self, fn: Callable[..., torch.Tensor], reduction: str = "mean", **kwargs: Any):
        super().__init__()
        self.fn, self.reduction, self.kwargs = fn, reduction, kwargs

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kwargs = {
            k: torch.as_tensor(v, dtype=output.dtype, device=output.device) if isinstance(v, list) else v
            for k, v in self.kwargs.items()
        }
        return self.fn(output, target, reduction=self.reduction, **kwargs)


def loss_name(cfg: Config) -> str:
    """train.loss, or the task's own loss when it is unset."""
    return cfg.train.loss or get_task(cfg.data).default_loss


def _resolve(cfg: Config) -> tuple[Any, bool]:
    """(the loss class or function, whether it is a functional one), or one line naming train.loss."""
    name = loss_name(cfg)
    own = get_task(cfg.data).losses()
    if name in own:
        return own[name], False
    losses = functional_losses()
    fn = losses.get(SHORT_NAMES.get(name, name))
    if fn is None:
        hint = difflib.get_close_matches(name, [*SHORT_NAMES, *own, *losses], n=1)
        more = f"did you mean '{hint[0]}'?" if hint else "mse, cross_entropy or a torch.nn.functional loss by name"
        raise UserError(f"train.loss: unknown loss '{name}' ({more})")
    return fn, True


def check_loss(cfg: Config) -> None:
    """train.loss names a loss, and train.loss_kwargs are keywords of it (one line otherwise)."""
    fn, functional = _resolve(cfg)
    kwargs = cfg.train.loss_kwargs
    if not kwargs:
        return
    name = loss_name(cfg)
    if not functional:
        raise UserError(f"train.loss_kwargs: the loss {name} takes no keywords")
    valid = [p for p in inspect.signature(fn).parameters if p not in NOT_KEYWORDS]
    for key in kwargs:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            more = f"did you mean '{hint[0]}'?" if hint else f"valid: {', '.join(valid) or 'none'}"
            raise UserError(f"train.loss_kwargs.{key}: {name} takes no keyword '{key}' ({more})")


def build_loss(cfg: Config, reduction: str) -> Loss:
    """The loss module, with `reduction` (the configured one, or "sum" on the ranks of a torchrun job)."""
    fn, functional = _resolve(cfg)
    if not functional:
        return fn(reduction=reduction)
    return FunctionalLoss(fn, reduction, **cfg.train.loss_kwargs)
