"""torchvision's image sets by name (data.name=torchvision:<set>): tiny files in each set's own layout and format,
read by torchvision's readers; missing and corrupt files; CIFAR's pickles refused unless data.trust_pickle."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from optcli.config import DataConfig
from optcli.tasks import load_data
from optcli.tasks.mnist import idx_files
from tests.conftest import assert_user_error, cli, make_digits, write_idx

CPU = torch.device("cpu")


def write_idx_int(path: Path, array: np.ndarray) -> None:
    """IDX with 0x0C = big-endian int32 values: QMNIST's labels (N x 8: the class first, then its extra fields)."""
    header = struct.pack(">BBBB", 0, 0, 0x0C, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(">i4").tobytes())


def write_set(root: Path, name: str, split: str | None = None, *, n: int = 60, label_offset: int = 0) -> Path:
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, seed in ((True, 1), (False, 2)):
        images, labels = make_digits(n, seed)
        image_file, label_file = idx_files(name, train=train, split=split)
        write_idx(raw / image_file, images)
        if name == "QMNIST":
            extra = np.zeros((n, 7), dtype=np.int64)
            write_idx_int(raw / label_file, np.column_stack([labels, extra]))
        else:
            write_idx(raw / label_file, labels + label_offset)
    return raw


SETS = [("FashionMNIST", None, 10), ("KMNIST", None, 10), ("EMNIST", "letters", 27), ("QMNIST", None, 10)]


@pytest.mark.parametrize(("name", "split", "classes"), SETS)
def test_each_idx_set_reads_its_own_layout(tmp_path, name, split, classes):
    write_set(tmp_path, name, split, label_offset=1 if split == "letters" else 0)
    cfg = DataConfig(name=f"torchvision:{name}", root=str(tmp_path), download=False, split=split, val_fraction=0.25)
    data = load_data(cfg, CPU)
    assert (len(data.train), len(data.val), len(data.test)) == (45, 15, 60)
    assert (data.in_features, data.out_features) == (784, classes)
    images, labels = make_digits(60, 2)  # the test split, in file order
    assert torch.equal(data.test.y, torch.from_numpy(labels).long() + (1 if split == "letters" else 0))
    pixel = (images[0, 0, 0] / 255 - 0.1307) / 0.3081  # pytorch/examples' Normalize
    assert data.test.x[0, 0].item() == pytest.approx(pixel, rel=1e-6)  # float32 arithmetic of one value


def test_fashion_mnist_trains_and_a_user_model_gets_images(tmp_path):
    write_set(tmp_path, "FashionMNIST")
    (tmp_path / "conv.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, input_shape, num_classes):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(input_shape[0], 4, 3)\n"
        "        self.out = nn.Linear(4 * 26 * 26, num_classes)\n"
        "    def forward(self, x):\n"
        "        assert x.shape[1:] == (1, 28, 28), x.shape\n"
        "        return self.out(self.conv(x).flatten(1))\n"
    )
    common = ["--set", "data.name=torchvision:FashionMNIST", "--set", f"data.root={tmp_path}"]
    common += ["--set", "data.download=false", "--set", "train.epochs=1"]
    result = cli("train", *common)
    assert result.exit_code == 0, result.output
    result = cli("train", *common, "--set", "model.name=conv:Net", "--set", f"model.path={tmp_path}")
    assert result.exit_code == 0, result.output
    assert "completed: 1/1 epochs" in result.output


def test_missing_and_corrupt_files_are_one_line(tmp_path):
    raw = write_set(tmp_path, "KMNIST")
    args = ["train", "--set", "data.name=torchvision:KMNIST", "--set", f"data.root={tmp_path}"]
    args += ["--set", "data.download=false"]
    (raw / "t10k-labels-idx1-ubyte").unlink()
    assert_user_error(cli(*args), "KMNIST not found in", tmp_path)
    assert "missing t10k-labels-idx1-ubyte" in cli(*args).output
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    assert_user_error(cli(*args), "corrupt or truncated", tmp_path)


def test_emnist_needs_a_split_and_an_unknown_set_is_named(tmp_path):
    args = ["train", "--set", f"data.root={tmp_path}", "--set", "data.download=false"]
    assert_user_error(cli(*args, "--set", "data.name=torchvision:EMNIST"), "data.split: torchvision:EMNIST", tmp_path)
    assert_user_error(cli(*args, "--set", "data.name=torchvision:SVHN"), "no image set 'SVHN'", tmp_path)


def write_cifar(root: Path, n: int = 40) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar_is_refused_unless_pickles_are_trusted(tmp_path):
    write_cifar(tmp_path)
    args = ["train", "--set", "data.name=torchvision:CIFAR10", "--set", f"data.root={tmp_path}"]
    args += ["--set", "train.epochs=1"]
    assert_user_error(cli(*args), "data.trust_pickle: torchvision:CIFAR10 is stored as Python pickles", tmp_path)
    result = cli(*args, "--set", "data.trust_pickle=true")
    assert result.exit_code == 0, result.output
    cfg = DataConfig(name="torchvision:CIFAR10", root=str(tmp_path), trust_pickle=True, normalize="unit")
    data = load_data(cfg, CPU)
    assert (len(data.train) + len(data.val), len(data.test), data.in_features) == (200, 40, 3072)
    assert 0.0 <= float(data.train.x.min()) and float(data.train.x.max()) <= 1.0
