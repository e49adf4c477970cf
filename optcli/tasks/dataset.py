"""data.name=pkg.module:factory: a user's map-style torch Dataset, made by calling the factory with data.kwargs.

The factory returns a Dataset (its validation split is held out by data.val_fraction/val_split) or a pair (train,
test). Samples are (input, target) pairs: the inputs become float32 rows (a model that asks for input_shape gets
them reshaped), integer targets are classes (max + 1 of them unless data.num_classes), float targets regression.
The data are held in memory as tensors when they need under half the free memory (or data.stream=false), and
streamed through a DataLoader otherwise (tasks/stream.py). Importing the module runs the user's code.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from optcli.config import IMPORT_PATH
from optcli.errors import UserError
from optcli.tasks import Split
from optcli.tasks.base import Kind, Task
from optcli.tasks.registry import register
from optcli.tasks.stream import StreamSplit, collate_rows, read_all
from optcli.tasks.user_code import first_line, import_callable


def free_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or the free pages where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, torch.Tensor)


@functools.lru_cache(maxsize=4)
def _made(name: str, path: str | None, kwargs_json: str) -> tuple[Any, Any | None]:
    """(train, test or None): the factory's datasets, made once per process for the same config."""
    factory = import_callable(name, path, key="data.name", path_key="data.path")
    kwargs = json.loads(kwargs_json)
    try:
        made = factory(**kwargs)
    except Exception as exc:  # the user's code
        raise UserError(f"data.name: {name}({', '.join(kwargs)}) raised {first_line(exc)}") from None
    pair = made if isinstance(made, tuple | list) and len(made) == 2 else (made, None)
    if not all(d is None or _is_dataset(d) for d in pair) or len(pair[0]) == 0:
        raise UserError(
            f"data.name: {name} returned a {type(made).__name__}, not a non-empty Dataset or a (train, test) pair"
        )
    return pair[0], pair[1]


def _first_sample(name: str, dataset: Any) -> tuple[tuple[int, ...], int]:
    """(the shape of sample 0's input, its number of values), or one line saying why it is not a sample."""
    try:
        sample = dataset[0]
    except Exception as exc:  # the user's __getitem__
        raise UserError(f"data.name: {name}: reading sample 0 raised {first_line(exc)}") from None
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise UserError(f"data.name: {name}: sample 0 is a {type(sample).__name__}, not an (input, target) pair")
    try:
        x, _ = collate_rows([sample])
    except Exception as exc:  # inputs or targets that are not numbers
        raise UserError(f"data.name: {name}: sample 0 is not (numbers, number) ({first_line(exc)})") from None
    return tuple(torch.as_tensor(sample[0]).shape) or (1,), x.shape[1]


@functools.lru_cache(maxsize=4)
def _sample_shape(name: str, path: str | None, kwargs_json: str) -> tuple[tuple[int, ...], int]:
    return _first_sample(name, _made(name, path, kwargs_json)[0])


@functools.lru_cache(maxsize=2)
def _read_splits(
    name: str, path: str | None, kwargs_json: str, stream: bool | None, workers: int
) -> tuple[Split, Split | None]:
    """(train, test or None) of the user's datasets, in memory or streamed, read once per process per config."""
    train_ds, test_ds = _made(name, path, kwargs_json)
    _, n_in = _sample_shape(name, path, kwargs_json)
    n = len(train_ds) + (len(test_ds) if test_ds is not None else 0)
    if stream is None:
        stream = n * (n_in + 2) * 4 > free_memory() / 2  # inputs and targets as 4-byte values
    return _split(name, train_ds, stream, n_in, workers), (
        _split(name, test_ds, stream, n_in, workers) if test_ds is not None else None
    )


def _split(name: str, dataset: Dataset, stream: bool, n_in: int, workers: int) -> Split:
    def error(exc: Exception) -> Exception:
        return UserError(f"data.name: {name}: reading its samples raised {first_line(exc)}")

    n = len(dataset)  # type: ignore[arg-type]
    x, y = read_all(dataset, n, keep_inputs=not stream, num_workers=workers, on_error=error)
    if (x is not None and x.shape[1] != n_in) or len(y) != n:
        raise UserError(f"data.name: {name}: the samples are not all of the first sample's shapes")
    if not y.is_floating_point() and (y.dim() != 1 or int(y.min()) < 0):
        raise UserError(f"data.name: {name}: integer targets must be one class index >= 0 per sample")
    if x is not None:
        return Split(x, y)
    return StreamSplit(dataset, torch.arange(n), y, n_in=n_in, num_workers=workers)


@register
class UserDataset(Task):
    """data.name=pkg.module:factory with data.kwargs and data.path (the module's folder): a user's Dataset."""

    name = "pkg.module:factory"

    @classmethod
    def claims(cls, name: str) -> bool:
        return re.fullmatch(IMPORT_PATH, name) is not None and not name.startswith("torchvision:")

    @property
    def _splits(self) -> tuple[Split, Split | None]:
        c = self.cfg
        return _read_splits(c.name, c.path, json.dumps(c.kwargs, sort_keys=True, default=str), c.stream, c.num_workers)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return _sample_shape(self.cfg.name, self.cfg.path, json.dumps(self.cfg.kwargs, sort_keys=True, default=str))[0]

    def may_stream(self) -> bool:
        return self.cfg.stream is not False

    @property
    def kind(self) -> Kind:
        return Kind.REGRESSION if self._splits[0].y.is_floating_point() else Kind.CLASSIFICATION

    def load(self) -> tuple[Split, Split | None]:
        return self._splits

    def shapes(self) -> tuple[int, int]:
        train, test = self._splits
        y = train.y
        if y.is_floating_point():
            return train.x.shape[1], y.shape[1]
        top = max(int(s.y.max()) for s in (train, test) if s is not None)
        if self.cfg.num_classes is not None and top >= self.cfg.num_classes:
            raise UserError(f"data.num_classes: {self.cfg.num_classes}, but {self.name} has a target {top}")
        return train.x.shape[1], self.cfg.num_classes or top + 1

    def description(self) -> str:
        train, test = self._splits
        n_in, n_out = self.shapes()
        what = f"{n_out} classes" if self.kind is Kind.CLASSIFICATION else f"{n_out} target(s)"
        how = "streamed" if isinstance(train, StreamSplit) else "in memory"
        sizes = f"{len(train)} + {len(test)} test" if test is not None else f"{len(train)}"
        return f"{self.name}: {sizes} samples, {n_in} inputs -> {what} ({how})"
