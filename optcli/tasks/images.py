"""data.name=torchvision:<set>: torchvision's image sets read from data.root as torchvision lays them out.

The IDX sets (MNIST, FashionMNIST, KMNIST, EMNIST with data.split, QMNIST) are read by torchvision's own readers
(tasks/mnist.py). CIFAR-10/100 are Python pickles, and unpickling runs whatever code the file holds: they are
refused unless data.trust_pickle is set. Images are held as flattened rows, as the MLP takes them; a user's model
whose factory names input_shape receives them reshaped to (N, C, H, W) (engine/user_model.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from optcli.config import Config
from optcli.errors import UserError
from optcli.tasks import Split
from optcli.tasks.base import Kind, Task
from optcli.tasks.mnist import load_idx_set
from optcli.tasks.registry import register

PREFIX = "torchvision:"
EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 27, "digits": 10, "mnist": 10}
IDX_SETS = {"MNIST": 10, "FashionMNIST": 10, "KMNIST": 10, "QMNIST": 10, "EMNIST": 0}  # EMNIST: by data.split
# folder under data.root, training files, test file, label key, classes: torchvision's CIFAR10/CIFAR100 layout
CIFAR = {
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10),
    "CIFAR100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # per channel, the usual constants


def load_cifar(root: str, which: str, normalize: str) -> tuple[Split, Split]:
    folder, train_files, test_file, label_key, classes = CIFAR[which]
    base = Path(root) / folder
    train = [_cifar_batch(base / f, label_key, classes) for f in train_files]
    x_train, y_train = (torch.cat(parts) for parts in zip(*train, strict=True))
    x_test, y_test = _cifar_batch(base / test_file, label_key, classes)
    return Split(_scale_cifar(x_train, normalize), y_train), Split(_scale_cifar(x_test, normalize), y_test)


def _cifar_batch(path: Path, label_key: str, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"data: {path} not found (torchvision's layout: data.root/{path.parent.name}/{path.name})")
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="latin1")  # noqa: S301 - the user set data.trust_pickle
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as exc:  # a corrupt pickle raises anything
        raise UserError(f"data: {path} is not a CIFAR batch ({type(exc).__name__}: {str(exc)[:160]})") from None
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= classes:
        raise UserError(f"data: {path} does not hold one class 0-{classes - 1} per image")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _scale_cifar(images: torch.Tensor, normalize: str) -> torch.Tensor:
    x = images.float()
    if normalize == "none":
        return x
    x = x.div_(255)
    if normalize == "unit":
        return x
    mean, std = torch.tensor(CIFAR_MEAN).repeat_interleave(1024), torch.tensor(CIFAR_STD).repeat_interleave(1024)
    return x.sub_(mean).div_(std)


@register
class TorchvisionImages(Task):
    """data.name=torchvision:<set>: FashionMNIST, KMNIST, EMNIST (data.split), QMNIST, MNIST, and with
    data.trust_pickle CIFAR10 and CIFAR100, from data.root (data.download fetches the IDX sets when missing)."""

    name = "torchvision:<set>"
    KIND = Kind.CLASSIFICATION

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.startswith(PREFIX)

    @property
    def dataset(self) -> str:
        return self.name.removeprefix(PREFIX)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        which, split = cfg.data.name.removeprefix(PREFIX), cfg.data.split
        if which not in IDX_SETS and which not in CIFAR:
            raise ValueError(
                f"data.name: torchvision has no image set {which!r} here ({', '.join([*IDX_SETS, *CIFAR])})"
            )
        if which == "EMNIST" and split not in EMNIST_CLASSES:
            raise ValueError(f"data.split: torchvision:EMNIST needs one of {', '.join(EMNIST_CLASSES)} (got {split!r})")
        if which != "EMNIST" and split is not None:
            raise ValueError(f"data.split: only torchvision:EMNIST has splits (data.name={cfg.data.name})")
        if which in CIFAR and not cfg.data.trust_pickle:
            raise ValueError(
                f"data.trust_pickle: torchvision:{which} is stored as Python pickles, and reading a pickle runs any "
                f"code it holds; set data.trust_pickle=true only for files from a source you trust"
            )

    @property
    def classes(self) -> int:
        if self.dataset in CIFAR:
            return CIFAR[self.dataset][4]
        return IDX_SETS[self.dataset] or EMNIST_CLASSES[str(self.cfg.split)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32) if self.dataset in CIFAR else (1, 28, 28)

    def load(self) -> tuple[Split, Split | None]:
        if self.dataset in CIFAR:
            return load_cifar(self.cfg.root, self.dataset, self.cfg.normalize)
        return load_idx_set(self.cfg, self.dataset, classes=self.classes, split=self.cfg.split)

    def shapes(self) -> tuple[int, int]:
        return int(np.prod(self.input_shape)), self.classes

    def description(self) -> str:
        split = f" ({self.cfg.split})" if self.cfg.split else ""
        shape = "x".join(map(str, self.input_shape))
        return f"torchvision {self.dataset}{split} ({shape} images -> {self.classes} classes)"
