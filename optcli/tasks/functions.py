"""2-D test functions as a task (data.name: function): the trained "parameters" are the point (x, y) itself, an
nn.Module holding one 2-element nn.Parameter whose forward returns the function's value, so every optimizer,
scheduler and inspect-params works on it unchanged, and a step is visibly x <- x - lr * df/dx.

The "data" is one dummy sample, so an epoch is one step; the loss (train.loss: value) is the model's output itself.
Each seed moves the start point by data.start_jitter times a standard normal draw of its own, so seeds differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optcli.config import Config, DataConfig
from optcli.tasks import Split
from optcli.tasks.base import Kind, Task
from optcli.tasks.registry import register

Fn = Callable[[torch.Tensor, torch.Tensor, DataConfig], torch.Tensor]


@dataclass(frozen=True)
class TestFunction:
    fn: Fn
    minimum: tuple[float, float]  # the known global minimum
    start: tuple[float, float]  # the default start point
    box: tuple[float, float, float, float]  # x0, x1, y0, y1 of the contour plot


def _rosenbrock(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _rastrigin(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return 20 + x**2 - 10 * torch.cos(2 * math.pi * x) + y**2 - 10 * torch.cos(2 * math.pi * y)


def _beale(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _quadratic(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(x² + κ y²) / 2: curvature 1 along x and κ (data.condition) along y, the condition number."""
    return (x**2 + cfg.condition * y**2) / 2


FUNCTIONS = {
    "rosenbrock": TestFunction(_rosenbrock, (1.0, 1.0), (-1.5, 2.0), (-2.0, 2.0, -1.0, 3.0)),
    "rastrigin": TestFunction(_rastrigin, (0.0, 0.0), (-2.0, 3.5), (-4.5, 4.5, -4.5, 4.5)),
    "beale": TestFunction(_beale, (3.0, 0.5), (1.0, 1.5), (-4.5, 4.5, -4.5, 4.5)),
    "quadratic": TestFunction(_quadratic, (0.0, 0.0), (-2.0, 1.0), (-3.0, 3.0, -2.0, 2.0)),
}


def start_point(cfg: DataConfig, seed: int) -> list[float]:
    """The configured start (or the function's default), jittered by the run's seed."""
    base = cfg.start if cfg.start is not None else list(FUNCTIONS[cfg.function].start)
    if cfg.start_jitter == 0:
        return [float(v) for v in base]
    noise = torch.randn(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [float(b + cfg.start_jitter * n) for b, n in zip(base, noise.tolist(), strict=True)]


class Point(nn.Module):
    """The point being optimized: parameter `xy`; forward returns f(x, y) once per input row (the input is a
    dummy batch, so the training loop runs unchanged)."""

    def __init__(self, cfg: DataConfig, start: list[float]):
        super().__init__()
        self.cfg = cfg
        self.fn = FUNCTIONS[cfg.function].fn
        self.xy = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def value(self) -> torch.Tensor:
        return self.fn(self.xy[0], self.xy[1], self.cfg)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.value().expand(batch.shape[0])


class FunctionValue(nn.modules.loss._Loss):
    """The loss of the function task: the model's output is the function's value (summed over the dummy rows)."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum() if self.reduction == "sum" else output.mean()


def load_function(cfg: DataConfig) -> Split:
    """One dummy sample: the input only sets the batch size; the target is unused."""
    return Split(torch.zeros(1, 1), torch.zeros(1))


def evaluate_at(cfg: DataConfig, xy: list[float]) -> float:
    x, y = torch.tensor(xy, dtype=torch.float64)
    return float(FUNCTIONS[cfg.function].fn(x, y, cfg))


def grid(cfg: DataConfig, box: list[float], n: int = 300) -> dict[str, list]:
    """The function on an n x n grid over box, in float64, for a contour plot."""
    x0, x1, y0, y1 = box
    xs, ys = torch.linspace(x0, x1, n, dtype=torch.float64), torch.linspace(y0, y1, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return {"x": xs.tolist(), "y": ys.tolist(), "z": FUNCTIONS[cfg.function].fn(gx, gy, cfg).tolist()}


def plot_box(box: tuple[float, float, float, float], points: list[list]) -> list[float]:
    """The function's own box grown to hold every finite point, but at most 3x its size each way (a diverging
    run would otherwise shrink everything else to a dot)."""
    x0, x1, y0, y1 = box
    w, h = x1 - x0, y1 - y0
    finite = [(x, y) for x, y in points if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    xs, ys = [p[0] for p in finite] + [x0, x1], [p[1] for p in finite] + [y0, y1]
    pad_x, pad_y = 0.05 * w, 0.05 * h
    return [
        max(min(xs) - pad_x, x0 - w),
        min(max(xs) + pad_x, x1 + w),
        max(min(ys) - pad_y, y0 - h),
        min(max(ys) + pad_y, y1 + h),
    ]


class PositionTracker:
    """An epoch callback (engine.loop.EpochCallback): the point, f there and the distance to the known minimum after
    each epoch (one step), in EpochMetrics.position; compare draws the trajectories from it."""

    def __init__(self, model: Point):
        self.model = model
        self.minimum = FUNCTIONS[model.cfg.function].minimum

    def epoch_end(self, metrics: Any, step_losses: torch.Tensor) -> None:
        x, y = self.model.xy.detach().double().tolist()
        value = evaluate_at(self.model.cfg, [x, y])
        finite = all(math.isfinite(v) for v in (x, y, value))
        metrics.position = {
            "x": x if math.isfinite(x) else None,
            "y": y if math.isfinite(y) else None,
            "value": value if finite else None,
            "distance": math.dist((x, y), self.minimum) if finite else None,
        }

    def close(self) -> None:
        """Nothing to release."""


def describe_function(cfg: DataConfig, seeds: list[int], trials: list[Any]) -> dict:
    """What the trajectory plot needs besides the trials: the function, its minimum, each seed's start, a box."""
    known = FUNCTIONS[cfg.function]
    starts = {seed: start_point(cfg, seed) for seed in seeds}
    points = list(starts.values()) + [
        [e.position["x"], e.position["y"]] for t in trials for e in t.history.epochs if e.position
    ]
    return {
        "name": cfg.function,
        "minimum": list(known.minimum),
        "starts": starts,
        "box": plot_box(known.box, points),
        "data": cfg.model_dump(mode="json"),
    }


@register
class Function(Task):
    """data.name=function: a 2-D test function (data.function) whose point (x, y) is the model; its loss (value)
    is the function's value there."""

    name = "function"
    KIND = Kind.FUNCTION
    own_model_note = "a 2-D test function's model is the point itself, not an MLP"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.train.loss not in (None, "value"):
            raise ValueError("train.loss: value goes with data.name=function, and only with it (the loss is f(x, y))")

    def load(self) -> tuple[Split, Split | None]:
        return load_function(self.cfg), None

    def shapes(self) -> tuple[int, int]:
        return 1, 1

    def description(self) -> str:
        return f"2-D test function {self.cfg.function}"

    @property
    def has_validation(self) -> bool:
        return False  # one dummy sample: nothing to hold out, whatever data.val_fraction says

    def example_batch(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(n, 1), torch.zeros(n)

    def default_model(self, seed: int) -> nn.Module | None:
        return Point(self.cfg, start_point(self.cfg, seed))

    def losses(self) -> dict[str, Any]:
        return {"value": FunctionValue}

    def epoch_callbacks(self, model: nn.Module) -> list[Any]:
        return [PositionTracker(model)] if isinstance(model, Point) else []

    def describe_comparison(self, seeds: list[int], trials: list[Any]) -> dict | None:
        return describe_function(self.cfg, seeds, trials)
