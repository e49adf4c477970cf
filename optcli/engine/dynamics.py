"""How an optimizer moves the weights, per epoch and per layer: what the seed articles ask of step().

- grad_norm: the root mean square of the layer's gradient norm ||g|| (weight and bias together) over the epoch's
  sampled steps, the 1st, 1 + SAMPLE_EVERY-th, ... of each epoch, accumulated on the device by an optimizer step
  pre-hook: one torch._foreach_norm over all gradients per sampled step, no host sync.
- update_ratio: ||Δw|| / ||w|| of one step (the epoch's first), the update-to-weight ratio (about 1e-3 is the
  usual rule of thumb for a healthy lr).
- step_size: ||Δw|| / ||g|| of the same step, the effective step size: exactly the lr for plain SGD, and what
  momentum or Adam's per-coordinate scaling make of it otherwise.
- epoch_update_ratio: ||w_end - w_start|| / ||w_start|| over the whole epoch, from two weight snapshots.
- state_bytes: the bytes of the tensors the optimizer holds in its state (Adam two per parameter, SGD without
  momentum none).

Only the first step of an epoch is copied and compared, so between samples a step costs two hook calls that return
at once. Stacked seeds (engine/stacked.py: every parameter with a leading seed dimension) are measured by one
Dynamics for all of them, each norm taken per seed slice: the same numbers as one Dynamics per plain seed, for the
hook calls and norm launches of one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from optcli.config import Config
from optcli.engine.loop import EpochCallback, EpochMetrics
from optcli.tasks.registry import get_task

SAMPLE_EVERY = 10  # steps between gradient-norm samples: norms at every step cost ~3% of an MNIST epoch


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

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, stacked: bool = False):
        self.optimizer, self.stacked = optimizer, stacked
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.layers = list(dict.fromkeys(layer_of(n) for n, _ in named))
        index = {layer: i for i, layer in enumerate(self.layers)}
        self.layer_index = torch.tensor([index[layer_of(n)] for n, _ in named], device=self._device())
        self.start = self._snapshot()  # the weights at the epoch's start
        self.first = self._snapshot()  # before the epoch's first step; both buffers reused, never reallocated
        self._reset()
        self.handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]

    def _snapshot(self) -> list[torch.Tensor]:
        return [w.clone() for w in self._weights()]

    def _zeros(self) -> torch.Tensor:
        """One value per layer, or per layer and seed when stacked."""
        shape = (len(self.layers), len(self.params[0])) if self.stacked and self.params else (len(self.layers),)
        return torch.zeros(shape, device=self._device())

    def _reset(self) -> None:
        self.grad_sq = self._zeros()
        self.steps = self.samples = 0
        self.sample: dict | None = None

    def _layer_sq(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per layer (and seed), the sum of the squared norms of its tensors (a missing gradient counts as zero)."""
        sums = self._zeros()
        present = [t for t in tensors if t is not None]
        if not present:
            return sums
        index = self.layer_index
        if len(present) < len(tensors):
            index = index[[i for i, t in enumerate(tensors) if t is not None]]
        if self.stacked:  # (tensors, seeds): each seed's slice flattened
            norms = torch.stack([torch.linalg.vector_norm(t.reshape(len(t), -1), dim=1) for t in present])
        else:
            norms = torch.stack(torch._foreach_norm(present))
        return sums.index_add_(0, index, norms.float().square())

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if (self.steps - 1) % SAMPLE_EVERY:
            return
        grad_sq = self._layer_sq([p.grad for p in self.params])
        self.grad_sq += grad_sq
        self.samples += 1
        if self.steps == 1:
            torch._foreach_copy_(self.first, self._weights())
            self.first_grad_sq = grad_sq

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.steps != 1 or self.sample is not None:
            return
        weight_sq = self._layer_sq(self.first)
        torch._foreach_sub_(self.first, self._weights())  # -Δw, in place
        self.sample = {"delta_sq": self._layer_sq(self.first), "weight_sq": weight_sq, "grad_sq": self.first_grad_sq}

    def epoch_end(self, metrics: EpochMetrics, step_losses: torch.Tensor) -> None:
        metrics.dynamics = {"layers": self.measure()[0], "state_bytes": state_bytes(self.optimizer)}

    def measure(self) -> list[dict[str, dict[str, float | None]]]:
        """The epoch's measurements per layer, one dict per seed (one in all unless stacked); starts the next
        epoch's."""
        start_sq = self._layer_sq(self.start)
        torch._foreach_sub_(self.start, self._weights())  # w_start - w_end, in place
        moved_sq = self._layer_sq(self.start)
        columns = {
            "grad_norm": (self.grad_sq / max(self.samples, 1)).sqrt(),
            "epoch_update_ratio": (moved_sq / start_sq).sqrt(),
        }
        if self.sample is not None:
            columns["update_ratio"] = (self.sample["delta_sq"] / self.sample["weight_sq"]).sqrt()
            columns["step_size"] = (self.sample["delta_sq"] / self.sample["grad_sq"]).sqrt()
        # one host sync per epoch; stacked, each column becomes (seeds, layers)
        values = {k: (v.T if self.stacked else v.unsqueeze(0)).tolist() for k, v in columns.items()}
        seeds = len(values["grad_norm"])
        torch._foreach_copy_(self.start, self._weights())
        self._reset()
        return [
            {layer: {k: _finite(v[s][i]) for k, v in values.items()} for i, layer in enumerate(self.layers)}
            for s in range(seeds)
        ]

    def keep(self, index: torch.Tensor) -> None:
        """Stacked: only the seeds at `index` go on (engine.stacked.retire), called between epochs."""
        self.start = [t[index] for t in self.start]
        self.first = [t[index] for t in self.first]
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
