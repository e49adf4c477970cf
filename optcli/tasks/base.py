"""The Task interface: everything the rest of optcli asks of a problem, in one object.

A task is a class registered by name (tasks/registry.py) and made from the data section of a config. It gives its
data (train/validation/test on the device), its kind, input and output shapes, the default loss, the metrics it has
and which of them are higher-is-better, its loss floor when it knows one, a default model when it has one, and a
description. Nothing outside tasks/ compares a task's name to a string: it asks this object.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from optcli.config import Config, DataConfig
from optcli.tasks import Data, Split, split_validation


class Kind(str, Enum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    FUNCTION = "function"


# the per-epoch evaluation metrics of each kind beyond the losses; the EpochMetrics fields of the same names
KIND_METRICS: dict[Kind, tuple[str, ...]] = {
    Kind.CLASSIFICATION: ("val_accuracy",),
    Kind.REGRESSION: ("val_r2",),
    Kind.FUNCTION: (),
}
DEFAULT_LOSSES = {Kind.CLASSIFICATION: "cross_entropy", Kind.REGRESSION: "mse", Kind.FUNCTION: "value"}
HIGHER_IS_BETTER = frozenset({"val_accuracy", "test_accuracy", "val_r2"})
LOSS_METRICS = ("train_loss", "val_loss")

# (summary key, table header, lower is better, shown as a percentage, priority when the terminal is narrow)
KIND_COLUMNS: dict[str, list[tuple[str, str, bool, bool, int]]] = {
    Kind.CLASSIFICATION: [
        ("val_accuracy", "val acc", False, True, 700),
        ("test_accuracy", "test acc", False, True, 650),
    ],
    Kind.REGRESSION: [("val_r2", "val R²", False, False, 700)],
    Kind.FUNCTION: [
        ("final_value", "final f(x, y)", True, False, 750),
        ("distance_to_min", "distance to min", True, False, 700),
    ],
}


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def lacks_metric(task: Task, metric: str) -> str:
    """Why `task` has no `metric`: '<task> (<kind>) has no <metric> (a <kind> metric; its metrics: ...)'."""
    owners = [k.value for k, names in KIND_METRICS.items() if metric in names]
    owner = f"a {owners[0]} metric; " if owners else ""
    return f"data.name={task.name} ({task.kind.value}) has no {metric} ({owner}its metrics: {', '.join(task.metrics)})"


def kind_columns(kind: str) -> list[tuple[str, str, bool, bool, int]]:
    """The table columns a comparison of this kind shows beside the losses (the kind as stored in summary.json)."""
    return KIND_COLUMNS.get(kind, [])


class Task:
    """One problem. Subclasses set the class attributes and implement `load` and `shapes`."""

    name: ClassVar[str]  # the data.name that selects it
    KIND: ClassVar[Kind]  # a task whose kind depends on its data overrides the property `kind` instead
    DEFAULT_LOSS: ClassVar[str | None] = None  # None: the kind's own (DEFAULT_LOSSES)
    own_model_note: ClassVar[str | None] = None  # why a task that brings its own model cannot take another one

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether data.name=`name`, besides the registered name, selects this task (torchvision:<set>, ...)."""
        return False

    @property
    def kind(self) -> Kind:
        return self.KIND

    @property
    def default_loss(self) -> str:
        """The loss when train.loss is unset."""
        return self.DEFAULT_LOSS or DEFAULT_LOSSES[self.kind]

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, with a ValueError naming the key, a config this task cannot run; subclasses add their own."""

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Config validation's questions to the task: its own rules, the loss against its kind, the early-stopping
        metric against its metrics, a user's model against a task that brings its own."""
        cls.check_config(cfg)
        if cls.own_model_note is not None and cfg.model.is_user_model:
            raise ValueError(f"model.name: data.name={cls.name} trains its own model ({cls.own_model_note})")
        task = cls(cfg.data)
        if cfg.train.loss is not None:
            task.check_loss(cfg.train.loss)
        stop = cfg.train.early_stopping
        if stop is None:
            return
        if stop.metric.startswith("val_") and cfg.data.val_fraction == 0:
            raise ValueError(
                f"train.early_stopping.metric: {stop.metric} needs a validation split; "
                f"set data.val_fraction > 0 (or monitor train_loss)"
            )
        if stop.metric not in task.metrics:
            raise ValueError(f"train.early_stopping.metric: {lacks_metric(task, stop.metric)}")

    def check_loss(self, loss: str) -> None:
        """Refuse a short-named loss that cannot fit this task's targets (a ValueError naming train.loss)."""
        if loss == "value" and "value" not in self.losses():
            raise ValueError("train.loss: value goes with data.name=function, and only with it (the loss is f(x, y))")
        wrong = {
            Kind.REGRESSION: ("cross_entropy", "needs class labels"),
            Kind.CLASSIFICATION: ("mse", "needs real-valued targets"),
        }
        bad, why = wrong.get(self.kind, ("", ""))
        if loss == bad:
            raise ValueError(f"train.loss: {loss} {why}; data.name={self.name} wants {self.default_loss}")

    def load(self) -> tuple[Split, Split | None]:
        """(training split before the validation hold-out, test split or None), on the CPU."""
        raise NotImplementedError

    def shapes(self) -> tuple[int, int]:
        """(in_features, out_features): the width of one input row and of the model's output."""
        raise NotImplementedError

    def description(self) -> str:
        return self.name

    def may_stream(self) -> bool:
        """Whether its training split may be read batch by batch from a Dataset rather than held as tensors."""
        return False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.shapes()[0],)

    @property
    def num_classes(self) -> int | None:
        return self.shapes()[1] if self.kind is Kind.CLASSIFICATION else None

    @property
    def has_validation(self) -> bool:
        return self.cfg.val_fraction > 0

    @property
    def metrics(self) -> tuple[str, ...]:
        """The per-epoch metrics its runs report: the losses and its kind's scores (validation ones need a split)."""
        names = (*LOSS_METRICS, *KIND_METRICS[self.kind])
        return tuple(m for m in names if self.has_validation or not m.startswith("val_"))

    def loss_floor(self, reduction: str) -> float | None:
        """The lowest expected validation loss any model can reach, when the task knows it."""
        return None

    def default_model(self, seed: int) -> nn.Module | None:
        """The task's own model (a 2-D function's point), or None: the config's model is built."""
        return None

    def losses(self) -> dict[str, Any]:
        """Losses only this task has, by name: a class taking `reduction`."""
        return {}

    def epoch_callbacks(self, model: nn.Module) -> list[Any]:
        """Measurements after each epoch that only this task has (engine.loop.EpochCallback)."""
        return []

    def describe_comparison(self, seeds: list[int], trials: list[Any]) -> dict | None:
        """What a comparison of this task saves besides its trials (a 2-D function's trajectories), or None."""
        return None

    def example_batch(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros shaped as `n` samples of this task's inputs and targets, to check a model and a loss on."""
        n_in, n_out = self.shapes()
        x = torch.zeros(n, n_in)  # inputs are rows; a model that asks for input_shape sees them reshaped
        y = torch.zeros(n, dtype=torch.long) if self.kind is Kind.CLASSIFICATION else torch.zeros(n, n_out)
        return x, y

    def prepare(self, train: Split, val: Split | None, test: Split | None) -> tuple[Split, Split | None, Split | None]:
        """The splits after the validation hold-out, before they move to the device (a file's standardization by
        the training statistics alone)."""
        return train, val, test

    def data(self, device: torch.device) -> Data:
        """The task's data on `device`, with data.val_fraction of the training split held out (data.val_split):
        a seeded random split (data.seed) or the last samples in file order."""
        train, test = self.load()
        train, val = split_validation(train, self.cfg.val_fraction, self.cfg.seed, how=self.cfg.val_split)
        n_in, n_out = self.shapes()
        return Data(*self.prepare(train, val, test), self.kind.value, n_in, n_out).to(device)


def is_real_valued(y: torch.Tensor) -> bool:
    """Targets that R² applies to: real values, one row of outputs per sample."""
    return y.is_floating_point() and y.dim() == 2


def r2_score(sse: torch.Tensor, y: torch.Tensor) -> float | None:
    """R² = 1 - SSE / SST per output, averaged over the outputs (scikit-learn's uniform_average), from the squared
    errors summed per output over the split; None when no output of the split varies."""
    sst = y.double().var(dim=0, correction=0) * y.shape[0]
    varies = sst > 0
    if not bool(varies.any()):
        return None
    return float((1 - sse.double()[varies] / sst[varies]).mean())
