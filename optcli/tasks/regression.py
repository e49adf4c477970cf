"""The synthetic regression tasks: a teacher plus noise (the default task), and the tutorial's random targets.

The teacher is a fixed random MLP seeded by data.seed; the targets are its outputs (scaled to unit variance
per output) plus Gaussian noise of std data.noise. No model can predict the noise, so the best achievable
expected MSE per output is noise**2: train and compare report the validation loss above that floor.
"""

from __future__ import annotations

import torch

from optcli.config import Config, DataConfig
from optcli.tasks import Split
from optcli.tasks.base import Kind, Task
from optcli.tasks.registry import register

TEACHER_HIDDEN = 32  # the teacher's one tanh layer: nonlinear enough that a linear fit leaves a clear gap


def load_regression(cfg: DataConfig) -> Split:
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.target == "random":  # the tutorial: inputs and targets both N(0, 1), independent of each other
        return Split(
            torch.randn(cfg.samples, cfg.inputs, generator=g), torch.randn(cfg.samples, cfg.outputs, generator=g)
        )
    x = torch.randn(cfg.samples, cfg.inputs, generator=g)
    w1 = torch.randn(cfg.inputs, TEACHER_HIDDEN, generator=g) / cfg.inputs**0.5
    w2 = torch.randn(TEACHER_HIDDEN, cfg.outputs, generator=g) / TEACHER_HIDDEN**0.5
    signal = torch.tanh(x @ w1) @ w2
    signal = signal / signal.std(dim=0, keepdim=True).clamp_min(1e-12)
    return Split(x, signal + cfg.noise * torch.randn(cfg.samples, cfg.outputs, generator=g))


def loss_floor(cfg: DataConfig, reduction: str) -> float | None:
    """The lowest expected loss any model can reach on unseen samples, in the units train and compare report
    (MSE averaged over samples and outputs for reduction="mean", summed over outputs for "sum"); None when
    the task has no known floor."""
    from optcli.tasks.registry import get_task

    return get_task(cfg).loss_floor(reduction)


@register
class Regression(Task):
    """data.name=regression: the teacher plus noise (data.target=teacher, the default) or the tutorial's random
    targets (data.target=random), data.samples rows of data.inputs features and data.outputs targets."""

    name = "regression"
    KIND = Kind.REGRESSION

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.data.normalize != "standardize":
            raise ValueError("data.normalize: applies to MNIST only; the regression inputs are already N(0, 1)")

    def load(self) -> tuple[Split, Split | None]:
        return load_regression(self.cfg), None

    def shapes(self) -> tuple[int, int]:
        return self.cfg.inputs, self.cfg.outputs

    def description(self) -> str:
        what = "teacher + noise" if self.cfg.target == "teacher" else "random targets (the tutorial)"
        return f"synthetic regression, {what}: {self.cfg.samples} x {self.cfg.inputs} -> {self.cfg.outputs}"

    def loss_floor(self, reduction: str) -> float | None:
        if self.cfg.target != "teacher":
            return None
        return self.cfg.noise**2 * (self.cfg.outputs if reduction == "sum" else 1)
