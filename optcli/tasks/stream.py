"""A split of a user's Dataset read batch by batch through a DataLoader, for data that does not fit in memory.

Its targets are held (one pass reads them, to learn the kind and the classes); its inputs are loaded on demand.
The batch order is the in-memory path's: the epoch's permutation (a function of seed and epoch) cut into batches,
handed to the DataLoader as its batch sampler, so every optimizer of a seed sees the same batches in the same
order, and the same batches as the in-memory path, whatever data.num_workers is.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Generator, Iterator
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from optcli.rundir import signals
from optcli.tasks import Split

LOAD_BATCH = 256  # samples per DataLoader batch when inputs are loaded outside training (evaluation, inspection)


def collate_rows(samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs as float32 rows, targets as int64 classes or float32 rows) of a list of (input, target) samples."""
    x, y = default_collate(samples)
    x = torch.as_tensor(x).reshape(len(samples), -1).float()
    y = torch.as_tensor(y)
    y = y.long() if not y.is_floating_point() else y.reshape(len(samples), -1).float()
    return x, y


def _collate_arrays(samples: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """collate_rows as NumPy arrays: a worker sends them by value through its queue, not as shared-memory tensors
    whose file descriptors a helper thread hands over, and which print a traceback when the run stops mid-batch."""
    x, y = collate_rows(samples)
    return x.numpy(), y.numpy()


def _quiet_worker(worker_id: int) -> None:
    """A loader worker leaves stopping to the run: it ignores the stop signals that reach the whole process group
    (the terminal's Ctrl-C, SIGHUP), and the run's DataLoader ends it when the run stops."""
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def iterate(data: DataLoader) -> Generator[Any, None, None]:
    """The batches of `data`, its workers ended on any exit. The workers are forked and ended with a stop signal
    held (signals.held: raised after, not inside): landing while a worker starts, it left the loader half-built and
    its workers running until the interpreter's exit (where torch reports them killed), or was raised inside a
    fork callback (logging's), which drops it: the run trained on. Ended explicitly, as a stop's traceback keeps
    the iterator, and its workers, alive."""
    batches = None
    try:
        with signals.held():
            batches = iter(data)
        yield from batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # the DataLoader iterator's own end of its workers
        if shutdown is not None:
            with signals.held():
                shutdown()


def loader(dataset: Dataset, num_workers: int, **kwargs: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a DataLoader over `dataset` (batch_sampler or batch_size in `kwargs`) as tensors."""
    init = _quiet_worker if num_workers > 0 else None
    data = DataLoader(dataset, num_workers=num_workers, collate_fn=_collate_arrays, worker_init_fn=init, **kwargs)
    with contextlib.closing(iterate(data)) as batches:
        for x, y in batches:
            yield torch.from_numpy(x), torch.from_numpy(y)


class StreamInputs:
    """The inputs of a StreamSplit, indexed like a tensor (a slice or indices), each read loading those samples."""

    def __init__(self, split: StreamSplit):
        self._split = split

    @property
    def device(self) -> torch.device:
        return self._split.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._split), self._split.n_in))

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        idx = torch.arange(len(self._split))[key] if isinstance(key, slice) else key.cpu()
        with contextlib.closing(self._split.load(list(idx.split(LOAD_BATCH)))) as loaded:  # its workers end here
            chunks = [x for x, _ in loaded]
        return torch.cat(chunks) if chunks else torch.empty(0, self._split.n_in, device=self.device)


class StreamSplit(Split):
    """Samples `indices` of `dataset`, with their targets `y` (held); inputs of `n_in` values loaded on demand."""

    def __init__(
        self, dataset: Dataset, indices: torch.Tensor, y: torch.Tensor, *, n_in: int, num_workers: int
    ) -> None:
        self.dataset, self.indices, self.n_in, self.num_workers = dataset, indices, n_in, num_workers
        super().__init__(cast(torch.Tensor, StreamInputs(self)), y)

    @property
    def device(self) -> torch.device:
        return self.y.device

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, key: slice | torch.Tensor) -> StreamSplit:
        return StreamSplit(self.dataset, self.indices[key], self.y[key], n_in=self.n_in, num_workers=self.num_workers)

    def to(self, device: torch.device) -> StreamSplit:
        return StreamSplit(self.dataset, self.indices, self.y.to(device), n_in=self.n_in, num_workers=self.num_workers)

    def load(self, groups: list[torch.Tensor]) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """The batches of samples at positions `groups` (of this split), on the split's device."""
        if not groups:
            return
        sampler = [self.indices[g].tolist() for g in groups]
        for x, y in loader(self.dataset, self.num_workers, batch_sampler=sampler):
            yield x.to(self.device), y.to(self.device)

    def batches(self, batch_size: int, perm: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.load(list(perm.cpu().split(batch_size)))


def read_all(
    dataset: Dataset, n: int, *, keep_inputs: bool, num_workers: int, on_error: Callable[[Exception], Exception]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(inputs or None, targets) of every sample, in order, in one pass; `on_error` turns what the dataset
    raised into the error to raise."""
    init = _quiet_worker if num_workers > 0 else None
    loader = DataLoader(
        dataset,
        batch_size=LOAD_BATCH,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_rows,
        worker_init_fn=init,
    )
    xs, ys = [], []
    try:
        with contextlib.closing(iterate(loader)) as batches:
            for x, y in batches:
                ys.append(y)
                if keep_inputs:
                    xs.append(x)
    except Exception as exc:  # the user's __getitem__ or samples default_collate cannot batch
        raise on_error(exc) from None
    return (torch.cat(xs) if keep_inputs else None), torch.cat(ys)
