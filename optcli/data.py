"""Data as tensors on the target device: MNIST through torchvision, or the tutorial's synthetic regression.

Everything is loaded once and batched by index slicing with a seeded permutation per epoch,
so there is no per-sample Python work in the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from optcli.config import DataConfig
from optcli.errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the constants of pytorch/examples' Normalize
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Data:
    train: Split
    val: Split | None
    test: Split | None
    task: str  # "classification" or "regression"
    in_features: int
    out_features: int

    def to(self, device: torch.device) -> Data:
        return replace(
            self,
            train=Split(self.train.x.to(device), self.train.y.to(device)),
            val=_move(self.val, device),
            test=_move(self.test, device),
        )


def _move(split: Split | None, device: torch.device) -> Split | None:
    return Split(split.x.to(device), split.y.to(device)) if split is not None else None


def load_data(cfg: DataConfig, device: torch.device) -> Data:
    """The task's data on `device`, with `val_fraction` of the training split held out by a split seeded by
    data.seed: every run and every seed of a comparison sees the same data, wherever it runs."""
    seed = cfg.seed
    if cfg.name == "mnist":
        train, test = _load_mnist(cfg)
        task, n_in, n_out = "classification", 28 * 28, 10
    else:
        g = torch.Generator().manual_seed(seed)
        train = Split(
            torch.randn(cfg.samples, cfg.inputs, generator=g), torch.randn(cfg.samples, cfg.outputs, generator=g)
        )
        test, task, n_in, n_out = None, "regression", cfg.inputs, cfg.outputs
    train, val = split_validation(train, cfg.val_fraction, seed)
    return Data(train, val, test, task, n_in, n_out).to(device)


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    n_val = int(round(len(split) * fraction))
    if n_val == 0:
        return split, None
    if n_val >= len(split):
        raise UserError(f"data.val_fraction: {fraction} leaves no training samples out of {len(split)}")
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return Split(split.x[train_idx], split.y[train_idx]), Split(split.x[val_idx], split.y[val_idx])


def _load_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    from torchvision.datasets import MNIST

    raw = Path(cfg.root) / "MNIST" / "raw"
    splits = []
    for train in (True, False):
        try:
            ds = MNIST(cfg.root, train=train, download=cfg.download)
        except Exception as exc:  # torchvision raises RuntimeError, AssertionError, ValueError, URLError, ...
            missing = [f for f in MNIST_FILES if not (raw / f).exists()]
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if missing and not cfg.download:
                raise UserError(
                    f"data: MNIST not found in {raw} (missing {', '.join(missing)}); set data.download=true "
                    f"to fetch it, or data.root to a folder holding MNIST/raw/"
                ) from None
            if missing:
                raise UserError(
                    f"data: could not download MNIST into {raw} ({detail}); put the four IDX files "
                    f"there by hand and set data.download=false"
                ) from None
            raise UserError(f"data: the MNIST files in {raw} are corrupt or truncated ({detail})") from None
        images, labels = ds.data, ds.targets
        which = "train" if train else "t10k"
        if images.dim() != 3 or images.shape[1:] != (28, 28) or images.dtype != torch.uint8:
            raise UserError(
                f"data: {raw}/{which}-images-idx3-ubyte is not 28x28 uint8 images (shape {tuple(images.shape)})"
            )
        if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() > 9:
            raise UserError(f"data: {raw}/{which}-labels-idx1-ubyte does not hold one digit 0-9 per image")
        x = images.reshape(len(images), -1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        splits.append(Split(x, labels.long()))
    return splits[0], splits[1]


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The batch order of one epoch, a function of (seed, epoch) alone: every optimizer sees the same
    batches in the same order, and a resumed run needs no generator state to continue exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def batches(split: Split, batch_size: int, perm: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        idx = perm[start : start + batch_size]
        yield split.x[idx], split.y[idx]


def task_shape(cfg: DataConfig) -> tuple[int, int]:
    """(in_features, out_features) of the task, known without loading any data."""
    return (28 * 28, 10) if cfg.name == "mnist" else (cfg.inputs, cfg.outputs)
