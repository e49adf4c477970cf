"""How an optimizer moves the weights, per epoch and per layer: what the seed articles ask of step().

- grad_norm: the root mean square over the epoch's steps of the layer's gradient norm ||g|| (weight and bias
  together), accumulated on the device by an optimizer step pre-hook: one norm per tensor and step, no host sync.
- update_ratio: ||Δw|| / ||w|| of one step (the epoch's first), the update-to-weight ratio (about 1e-3 is the
  usual rule of thumb for a healthy lr).
- step_size: ||Δw|| / ||g|| of the same step, the effective step size: exactly the lr for plain SGD, and what
  momentum or Adam's per-coordinate scaling make of it otherwise.
- epoch_update_ratio: ||w_end - w_start|| / ||w_start|| over the whole epoch, from two weight snapshots.
- state_bytes: the bytes of the tensors the optimizer holds in its state (Adam two per parameter, SGD without
  momentum none).

Only the first step of an epoch is copied and compared, so the per-step cost is the gradient norms alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from optcli.config import Config
from optcli.engine.loop import EpochCallback, EpochMetrics
from optcli.tasks.registry import get_task


def layer_of(name: str) -> str:
    """fc1.weight -> fc1; a parameter without a module prefix is its own layer."""
    return name.rpartition(".")[0] or name


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


class Dynamics:
    """An epoch callback (train.EpochCallback) that fills EpochMetrics.dynamics; close() removes its hooks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.layers = list(dict.fromkeys(layer_of(n) for n, _ in named))
        index = {layer: i for i, layer in enumerate(self.layers)}
        self.layer_index = torch.tensor([index[layer_of(n)] for n, _ in named], device=self._device())
        self.start = self._snapshot()
        self._reset()
        self.handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def _reset(self) -> None:
        self.grad_sq = torch.zeros(len(self.layers), device=self._device())
        self.steps = 0
        self.sample: dict | None = None
        self.before: list[torch.Tensor] | None = None

    def _layer_sq(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per layer, the sum of the squared norms of its tensors (a missing gradient counts as zero)."""
        sq = torch.stack(
            [
                torch.linalg.vector_norm(t).square() if t is not None else torch.zeros((), device=self._device())
                for t in tensors
            ]
        )
        return torch.zeros(len(self.layers), device=sq.device).index_add_(0, self.layer_index, sq.float())

    def _before_step(self, optimizer, args, kwargs) -> None:
        grad_sq = self._layer_sq([p.grad for p in self.params])
        self.grad_sq += grad_sq
        self.steps += 1
        if self.steps == 1:
            self.before = self._snapshot()
            self.first_grad_sq = grad_sq

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.before is None:
            return
        delta_sq = self._layer_sq([p.detach() - b for p, b in zip(self.params, self.before, strict=True)])
        weight_sq = self._layer_sq(self.before)
        self.sample = {"delta_sq": delta_sq, "weight_sq": weight_sq, "grad_sq": self.first_grad_sq}
        self.before = None

    def epoch_end(self, metrics: EpochMetrics, step_losses: torch.Tensor) -> None:
        moved_sq = self._layer_sq([p.detach() - s for p, s in zip(self.params, self.start, strict=True)])
        start_sq = self._layer_sq(self.start)
        columns = {
            "grad_norm": (self.grad_sq / max(self.steps, 1)).sqrt(),
            "epoch_update_ratio": (moved_sq / start_sq).sqrt(),
        }
        if self.sample is not None:
            columns["update_ratio"] = (self.sample["delta_sq"] / self.sample["weight_sq"]).sqrt()
            columns["step_size"] = (self.sample["delta_sq"] / self.sample["grad_sq"]).sqrt()
        values = {k: v.tolist() for k, v in columns.items()}  # one host sync per epoch
        metrics.dynamics = {
            "layers": {layer: {k: _finite(v[i]) for k, v in values.items()} for i, layer in enumerate(self.layers)},
            "state_bytes": state_bytes(self.optimizer),
        }
        self.start = self._snapshot()
        self._reset()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _finite(value: float) -> float | None:
    """0/0 (a zero weight or gradient) has no ratio: None, never NaN in the files."""
    return value if math.isfinite(value) else None


def epoch_callbacks(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[EpochCallback]:
    """The measurements a run or trial takes after each epoch; each has close() to call when training ends."""
    callbacks: list[EpochCallback] = [Dynamics(model, optimizer)] if cfg.train.dynamics else []
    return callbacks + get_task(cfg.data).epoch_callbacks(model)
