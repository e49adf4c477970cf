"""MNIST through torchvision's own reader, as one tensor of flattened, normalized images per split."""

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


def load_mnist(cfg: DataConfig) -> tuple[Split, Split]:
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
        x = scale_pixels(images.reshape(len(images), -1).float(), cfg.normalize)
        splits.append(Split(x, labels.long()))
    return splits[0], splits[1]


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
