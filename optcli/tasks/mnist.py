"""MNIST and torchvision's other IDX-format image sets (FashionMNIST, KMNIST, EMNIST, QMNIST) through torchvision's
own readers, as one tensor of flattened, normalized images per split."""

from __future__ import annotations

from pathlib import Path

import torch

from optcli.config import DataConfig
from optcli.errors import UserError
from optcli.tasks import Split
from optcli.tasks.base import Kind, Task
from optcli.tasks.registry import register

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the constants of pytorch/examples' Normalize
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def scale_pixels(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """Pixel values 0-255 as data.normalize says: standardized with pytorch/examples' constants, scaled to
    [0, 1] (the Keras example and many course protocols), or left as they are."""
    if normalize == "none":
        return x
    x = x.div_(255)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD) if normalize == "standardize" else x


def idx_files(name: str, *, train: bool, split: str | None = None) -> tuple[str, str]:
    """(images, labels) file names torchvision reads from <root>/<name>/raw for one split of the set `name`."""
    if name == "EMNIST":
        prefix = f"emnist-{split}-{'train' if train else 'test'}"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    if name == "QMNIST":
        prefix = f"qmnist-{'train' if train else 'test'}"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx2-int"
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _open(name: str, cfg: DataConfig, *, train: bool, split: str | None) -> object:
    import torchvision.datasets

    extra = {"split": split} if name == "EMNIST" else {}
    return getattr(torchvision.datasets, name)(cfg.root, train=train, download=cfg.download, **extra)


def _read(name: str, cfg: DataConfig, *, train: bool, split: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of one split, or one line saying which files are missing or corrupt."""
    raw = Path(cfg.root) / name / "raw"
    try:
        ds = _open(name, cfg, train=train, split=split)
    except Exception as exc:  # torchvision raises RuntimeError, AssertionError, ValueError, URLError, ...
        every = [f for t in (True, False) for f in idx_files(name, train=t, split=split)]
        missing = [f for f in every if not (raw / f).exists()]
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if missing and not cfg.download:
            raise UserError(
                f"data: {name} not found in {raw} (missing {', '.join(missing)}); set data.download=true "
                f"to fetch it, or data.root to a folder holding {name}/raw/"
            ) from None
        if missing:
            raise UserError(
                f"data: could not download {name} into {raw} ({detail}); put the {len(every)} IDX files "
                f"there by hand and set data.download=false"
            ) from None
        raise UserError(f"data: the {name} files in {raw} are corrupt or truncated ({detail})") from None
    labels = ds.targets  # type: ignore[attr-defined]
    if name == "QMNIST" and labels.dim() == 2:  # 8 columns per image: the class first (torchvision's compat=True)
        labels = labels[:, 0]
    return ds.data, labels  # type: ignore[attr-defined]


def load_idx_set(cfg: DataConfig, name: str, *, classes: int, split: str | None = None) -> tuple[Split, Split]:
    """The training and test splits of the IDX image set `name` under data.root, flattened and scaled."""
    raw = Path(cfg.root) / name / "raw"
    splits = []
    for train in (True, False):
        images, labels = _read(name, cfg, train=train, split=split)
        image_file, label_file = idx_files(name, train=train, split=split)
        if images.dim() != 3 or images.shape[1:] != (28, 28) or images.dtype != torch.uint8:
            raise UserError(f"data: {raw}/{image_file} is not 28x28 uint8 images (shape {tuple(images.shape)})")
        if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() >= classes:
            what = "one digit 0-9" if classes == 10 else f"one class 0-{classes - 1}"
            raise UserError(f"data: {raw}/{label_file} does not hold {what} per image")
        x = scale_pixels(images.reshape(len(images), -1).float(), cfg.normalize)
        splits.append(Split(x, labels.long()))
    return splits[0], splits[1]


def load_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    return load_idx_set(cfg, "MNIST", classes=10)


@register
class MNIST(Task):
    """data.name=mnist: 60,000 training and 10,000 test images of handwritten digits, each flattened to 784 pixels
    (data.normalize), from data.root (data.download when missing)."""

    name = "mnist"
    KIND = Kind.CLASSIFICATION

    def load(self) -> tuple[Split, Split | None]:
        return load_mnist(self.cfg)

    def shapes(self) -> tuple[int, int]:
        return 28 * 28, 10

    def description(self) -> str:
        return "MNIST digits (784 pixels -> 10 classes)"
