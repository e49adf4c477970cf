"""Shared test helpers: a CLI runner, and tiny MNIST files in torchvision's raw IDX layout."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optcli.cli import app


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so runs/ and data/ never touch the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def importable_module(folder: Path, module: str, source: str) -> Iterator[Path]:
    """For a fixture to `yield from`: `module`.py holding `source` in a new `folder`, imported fresh by the test
    (optcli adds the folder to sys.path) and forgotten after it."""
    folder.mkdir()
    (folder / f"{module}.py").write_text(source)
    yield folder
    sys.modules.pop(module, None)
    while str(folder) in sys.path:
        sys.path.remove(str(folder))


def cli(*args: str, width: int = 250):
    """Run optcli as a user would, on a wide terminal (unless `width` says otherwise) so cells are not wrapped.
    Rich reads COLUMNS once, when a console is made; the consoles live as long as the process, so set them too."""
    from optcli.report.console import console, err_console

    console.width = err_console.width = width
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})


def assert_user_error(result, fragment: str, tmp_path: Path) -> None:
    """Exit code 2, the fragment in the message, no traceback, and no run directory left behind."""
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as MNIST uses it: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class k lights up a 4x4 block at a position of its own, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, k in enumerate(labels):
        r, c = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
        images[i, r : r + 4, c : c + 4] = 255
    return images, labels


def write_tiny_mnist(root: Path, n_train: int = 300, n_test: int = 100) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    return write_tiny_mnist(tmp_path / "mnist")


def mnist_args(root: Path, *extra: str) -> list[str]:
    """A small MNIST run on the tiny files: real torchvision loading, seconds of training."""
    return [
        "--set",
        "data.name=mnist",
        "--set",
        f"data.root={root}",
        "--set",
        "data.download=false",
        "--set",
        "train.loss=cross_entropy",
        "--set",
        "train.reduction=mean",
        "--set",
        "data.batch_size=32",
        "--set",
        "data.val_fraction=0.2",
        "--set",
        "model.hidden=[32,16]",
        "--set",
        "optimizer.lr=0.01",
        *extra,
    ]


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
