"""A user's map-style Dataset by import path (data.name: module:factory): in memory or streamed through a
DataLoader with the same batches, the same batches for every optimizer of a seed, and one line for bad datasets."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optcli.config import DataConfig
from optcli.tasks import batches, epoch_permutation, load_data
from optcli.tasks.stream import StreamSplit
from tests.conftest import assert_user_error, cli, importable_module

CPU = torch.device("cpu")

DATASETS_PY = '''
import os

import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Class k: a Gaussian blob around a centre of its own; `log` appends each index read to a file."""

    def __init__(self, n, seed, classes=3, log=None, regression=False):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(classes, (n,), generator=g)
        self.x = torch.randn(n, 2, 3, generator=g) * 0.3 + self.y.view(-1, 1, 1).float()
        self.log, self.regression = log, regression

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{i}\\n")
        target = float(self.y[i]) * 0.5 if self.regression else int(self.y[i])
        return self.x[i], target


def pair(n=120, log=None, regression=False):
    return Blobs(n, 0, log=log, regression=regression), Blobs(40, 1, regression=regression)


def single(n=100):
    return Blobs(n, 0)


def raises(n=10):
    raise ValueError("no such folder")


def not_a_dataset():
    return 42


class NotPairs(Blobs):
    def __getitem__(self, i):
        return self.x[i]


class Strings(Blobs):
    def __getitem__(self, i):
        return "a picture", 1


class BadAt7(Blobs):
    def __getitem__(self, i):
        if i == 7:
            raise OSError("cannot read image 7")
        return super().__getitem__(i)


def not_pairs():
    return NotPairs(20, 0)


def strings():
    return Strings(20, 0)


def bad_at_7():
    return BadAt7(20, 0)
'''


@pytest.fixture(autouse=True)
def user_module(tmp_path):
    yield from importable_module(tmp_path / "userdata", "userdatasets", DATASETS_PY)


def data_cfg(folder: Path, factory: str, **kw) -> DataConfig:
    return DataConfig(name=f"userdatasets:{factory}", path=str(folder), **kw)


def args(folder: Path, factory: str = "pair", *extra: str) -> list[str]:
    return [
        *("--set", f"data.name=userdatasets:{factory}", "--set", f"data.path={folder}"),
        *("--set", "train.epochs=2", "--set", "data.batch_size=16", "--set", "model.hidden=[8]"),
        *extra,
    ]


def test_kind_and_shapes_come_from_the_samples(user_module):
    data = load_data(data_cfg(user_module, "pair", val_fraction=0.25), CPU)
    assert (data.task, data.in_features, data.out_features) == ("classification", 6, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 40)
    reg = load_data(data_cfg(user_module, "pair", kwargs={"regression": True}), CPU)
    assert (reg.task, reg.out_features, reg.train.y.dtype) == ("regression", 1, torch.float32)
    wide = load_data(data_cfg(user_module, "single", num_classes=5, val_fraction=0.0), CPU)
    assert (wide.out_features, wide.test, len(wide.train)) == (5, None, 100)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_the_in_memory_ones(user_module, workers):
    held = load_data(data_cfg(user_module, "pair", stream=False), CPU)
    streamed = load_data(data_cfg(user_module, "pair", stream=True, num_workers=workers), CPU)
    assert isinstance(streamed.train, StreamSplit) and not isinstance(held.train, StreamSplit)
    perm = epoch_permutation(len(held.train), 3, 2, CPU)
    pairs = list(zip(batches(held.train, 16, perm), batches(streamed.train, 16, perm), strict=True))
    assert len(pairs) == 6
    for (x1, y1), (x2, y2) in pairs:
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(streamed.val.x[:], held.val.x)


def read_column(path: Path, column: str) -> list[str]:
    with path.open() as f:
        return [row[column] for row in csv.DictReader(f)]


def test_streamed_training_is_the_in_memory_training(user_module, tmp_path):
    runs = {}
    for stream in ("false", "true"):
        result = cli("train", *args(user_module), "--set", f"data.stream={stream}", "--set", "name=s" + stream)
        assert result.exit_code == 0, result.output
        runs[stream] = next((tmp_path / "runs").glob(f"s{stream}*"))
    assert "(streamed)" in json.loads((runs["true"] / "summary.json").read_text())["task"]["description"]
    for column in ("train_loss", "val_loss", "val_accuracy"):
        assert read_column(runs["true"] / "metrics.csv", column) == read_column(runs["false"] / "metrics.csv", column)


def test_every_optimizer_of_a_seed_reads_the_same_batches(user_module, tmp_path):
    log = tmp_path / "reads.txt"
    extra = ["--set", "data.stream=true", "--set", f"data.kwargs={{n: 120, log: {log}}}", "--seeds", "1"]
    result = cli("compare", "sgd", "adam", *args(user_module, "pair", *extra))
    assert result.exit_code == 0, result.output
    reads = log.read_text().split()
    first_pass = 1 + 120  # sample 0 for the shapes, then every sample once, in order, when the data are loaded
    assert reads[:first_pass] == ["0"] + [str(i) for i in range(120)]
    trials = reads[first_pass:]
    assert len(trials) == 2 * 2 * 120  # two optimizers, two epochs of 96 training + 24 validation samples
    sgd, adam = trials[: len(trials) // 2], trials[len(trials) // 2 :]
    assert sgd == adam and sgd[:96] != sorted(sgd[:96], key=int)  # shuffled, and alike


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("raises", "data.name: userdatasets:raises(n) raised ValueError: no such folder"),
        ("not_a_dataset", "data.name: userdatasets:not_a_dataset returned a int, not a non-empty Dataset"),
        ("not_pairs", "data.name: userdatasets:not_pairs: sample 0 is a Tensor, not an (input, target) pair"),
        ("strings", "data.name: userdatasets:strings: sample 0 is not (numbers, number)"),
        ("bad_at_7", "data.name: userdatasets:bad_at_7: reading its samples raised OSError: cannot read image 7"),
        ("nowhere", "data.name: userdatasets has no nowhere"),
    ],
)
def test_a_bad_dataset_is_one_line_naming_data_name(user_module, tmp_path, factory, fragment):
    extra = ["--set", "data.kwargs={n: 10}"] if factory == "raises" else []
    assert_user_error(cli("train", *args(user_module, factory, *extra)), fragment, tmp_path)


def test_resume_continues_a_streamed_run_exactly(user_module, tmp_path):
    full = cli("train", *args(user_module, "pair", "--set", "data.stream=true", "--set", "name=full"))
    assert full.exit_code == 0, full.output
    half = cli("train", *args(user_module, "pair", "--set", "data.stream=true", "--set", "name=half"), "--epochs", "1")
    assert half.exit_code == 0, half.output
    half_dir = next((tmp_path / "runs").glob("half*"))
    resumed = cli("train", "--resume", str(half_dir), "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    full_dir = next((tmp_path / "runs").glob("full*"))
    assert read_column(half_dir / "metrics.csv", "val_loss") == read_column(full_dir / "metrics.csv", "val_loss")


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


@pytest.mark.slow
def test_sigterm_ends_a_streamed_run_and_its_loader_workers(user_module, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}
    extra = ["--set", "data.stream=true", "--set", "data.num_workers=2", "--set", "data.kwargs={n: 5000}"]
    command = [sys.executable, "-m", "optcli", "train", *args(user_module, "pair", *extra)]
    command += ["--set", "train.epochs=100000", "--set", "name=r"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "r"
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no epoch completed"
        time.sleep(0.05)
    # the signal lands while a loader's workers start or serve a batch: the moments that once left them running
    # until exit (torch's "worker killed" traceback) or dropped the signal inside a fork callback (training on)
    while len(workers := children(proc.pid)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "no loader workers"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "interrupted by SIGTERM" in out and "Traceback" not in out, out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    time.sleep(1.0)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "DataLoader workers outlived the run"


@pytest.mark.slow
def test_jobs_run_the_streamed_path_to_the_in_memory_results(user_module, tmp_path):
    summaries = {}
    for name, extra in (
        ("held", ["--set", "data.stream=false"]),
        ("jobs", ["--set", "data.stream=true", "--set", "data.num_workers=1", "--jobs", "2"]),
    ):
        result = cli("compare", "sgd", "adam", *args(user_module, "pair", *extra), "--seeds", "1", "--json")
        assert result.exit_code == 0, result.output
        summaries[name] = json.loads(result.stdout)

    def scores(summary: dict) -> dict:
        return {r["label"]: {k: v for k, v in r.items() if "loss" in k or "accuracy" in k} for r in summary["rows"]}

    assert scores(summaries["held"])["adam"]["best_val_loss"] > 0
    assert scores(summaries["jobs"]) == scores(summaries["held"])
