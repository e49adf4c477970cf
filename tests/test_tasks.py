"""The Task interface: the registry by name, what each task answers, the loss by name, the validation split, R²
for regression, and the data-file task through the CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from optcli.config import load_config
from optcli.engine.losses import build_loss, functional_losses
from optcli.tasks import Split, load_data, split_validation
from optcli.tasks import registry as registry_module
from optcli.tasks.base import Kind, Task, r2_score
from optcli.tasks.registry import get_task, register, task_names
from tests.conftest import assert_user_error, cli

CPU = torch.device("cpu")


def test_every_built_in_task_is_registered_and_answers_the_interface():
    assert {"regression", "mnist", "function", "file"} <= set(task_names())
    expected = {
        "regression": (Kind.REGRESSION, "mse", (20, 1), ("train_loss", "val_loss", "val_r2")),
        "mnist": (Kind.CLASSIFICATION, "cross_entropy", (784, 10), ("train_loss", "val_loss", "val_accuracy")),
        "function": (Kind.FUNCTION, "value", (1, 1), ("train_loss",)),  # one point: no validation data
    }
    for name, (kind, loss, shapes, metrics) in expected.items():
        task = get_task(load_config(None, [f"data.name={name}"]).data)
        assert (task.kind, task.default_loss, task.shapes(), task.metrics) == (kind, loss, shapes, metrics)
        assert task.description()
    task = get_task(load_config(None, ["data.val_fraction=0"]).data)
    assert task.metrics == ("train_loss",) and not task.has_validation
    assert get_task(load_config(None).data).loss_floor("mean") == 0.25  # noise 0.5 squared
    assert get_task(load_config(None, ["data.target=random"]).data).loss_floor("mean") is None


def test_switching_data_name_alone_switches_the_task_and_its_loss(tiny_mnist, tmp_path):
    args = ["--set", "data.name=mnist", "--set", f"data.root={tiny_mnist}", "--set", "data.download=false"]
    result = cli("train", *args, "--set", "train.epochs=1", "--set", "name=m")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "runs" / "m" / "metrics.csv").open()))
    assert float(rows[0]["val_accuracy"]) > 0.1 and rows[0]["val_r2"] == ""
    summary = json.loads((tmp_path / "runs" / "m" / "summary.json").read_text())
    assert summary["task"] == {
        "name": "mnist",
        "kind": "classification",
        "description": "MNIST digits (784 pixels -> 10 classes)",
    }


class Toy(Task):
    """A task of one file: y = sign of the first feature, two classes."""

    name = "toy"
    KIND = Kind.CLASSIFICATION

    def load(self) -> tuple[Split, Split | None]:
        x = torch.randn(200, 3, generator=torch.Generator().manual_seed(self.cfg.seed))
        return Split(x, (x[:, 0] > 0).long()), None

    def shapes(self) -> tuple[int, int]:
        return 3, 2


def test_a_new_task_is_one_registered_class(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "_TASKS", dict(registry_module._TASKS))
    register(Toy)
    result = cli("train", "--set", "data.name=toy", "--set", "optimizer.lr=0.05", "--set", "name=t")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "runs" / "t" / "metrics.csv").open()))
    assert float(rows[-1]["val_accuracy"]) > 0.8
    compare = cli("compare", "sgd", "adam", "--set", "data.name=toy", "--set", "train.epochs=2", "--seeds", "1")
    assert compare.exit_code == 0, compare.output
    assert "val acc" in compare.output


def test_an_unknown_task_is_one_line_with_a_suggestion(tmp_path):
    assert_user_error(
        cli("train", "--set", "data.name=mnsit"), "data.name: no such task (did you mean 'mnist'?)", tmp_path
    )
    assert_user_error(
        cli("train", "--set", "data.name=zzz"),
        "tasks: file, function, mnist, pkg.module:factory, regression, torchvision:<set>",
        tmp_path,
    )


def test_no_module_outside_tasks_spells_a_task_name(repo_root):
    """A task is asked, never named: the registry's names appear as strings only inside optcli/tasks/."""
    pattern = re.compile(rf"""["']({"|".join(task_names())})["']""")
    offenders = [
        f"{path}:{i}"
        for path in (repo_root / "optcli").rglob("*.py")
        if "tasks" not in path.relative_to(repo_root / "optcli").parts
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []


# --- the loss by name -------------------------------------------------------------------------------------------


def test_short_names_are_torch_functional_losses_with_the_same_values():
    out, y = torch.randn(5, 3), torch.randn(5, 3)
    cfg = load_config(None, ["train.loss=mse"])
    assert torch.equal(build_loss(cfg, "sum")(out, y), torch.nn.MSELoss(reduction="sum")(out, y))
    labels = torch.tensor([0, 2, 1, 1, 0])
    ce = build_loss(load_config(None, ["data.name=mnist"]), "mean")
    assert torch.equal(ce(out, labels), torch.nn.CrossEntropyLoss()(out, labels))


def test_any_functional_loss_by_name_with_its_keywords(tmp_path):
    assert {"huber_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "l1_loss"} <= set(functional_losses())
    cfg = load_config(None, ["train.loss=huber_loss", "train.loss_kwargs={delta: 0.25}"])
    out, y = torch.randn(8, 1), torch.randn(8, 1)
    assert torch.equal(build_loss(cfg, "mean")(out, y), F.huber_loss(out, y, delta=0.25))
    result = cli("train", "--set", "train.loss=huber_loss", "--set", "train.loss_kwargs={delta: 0.25}",
                 "--set", "train.epochs=2", "--set", "name=h")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "runs" / "h" / "config.yaml").read_text())
    assert saved["train"]["loss"] == "huber_loss" and saved["train"]["loss_kwargs"] == {"delta": 0.25}


def test_cross_entropy_weights_from_a_list(tiny_mnist):
    cfg = load_config(None, ["data.name=mnist", "train.loss_kwargs={label_smoothing: 0.1, weight: [1,1,1]}"])
    out, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    want = F.cross_entropy(out, labels, weight=torch.ones(3), label_smoothing=0.1)
    assert torch.equal(build_loss(cfg, "mean")(out, labels), want)


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["train.loss=huber"], "train.loss: unknown loss 'huber' (did you mean 'huber_loss'?)"),
        (["train.loss=huber_loss", "train.loss_kwargs={delt: 1}"], "train.loss_kwargs.delt: huber_loss takes no "
         "keyword 'delt' (did you mean 'delta'?)"),
        (["data.name=function", "train.loss_kwargs={a: 1}"], "train.loss_kwargs: the loss value takes no keywords"),
        (["data.name=mnist", "train.loss=huber_loss"], "train.loss: huber_loss cannot take this task's outputs"),
        (["train.loss=cross_entropy"], "cross_entropy needs class labels; data.name=regression wants mse"),
        (["train.early_stopping={metric: val_accuracy}"], "has no val_accuracy (a classification metric; its metrics: "
         "train_loss, val_loss, val_r2)"),
        (["data.val_split=first"], "data.val_split: Input should be 'random' or 'last'"),
    ],
)  # fmt: skip
def test_bad_losses_and_metrics_are_one_line(sets, fragment, tmp_path):
    result = cli("train", *[a for s in sets for a in ("--set", s)])
    assert_user_error(result, fragment, tmp_path)
    assert fragment in " ".join(result.output.split())


# --- validation split and R² ------------------------------------------------------------------------------------


def test_val_split_last_holds_out_the_last_samples_and_random_is_seeded():
    full = Split(torch.arange(10.0).unsqueeze(1), torch.arange(10.0).unsqueeze(1))
    train, val = split_validation(full, 0.3, seed=0, how="last")
    assert val is not None and val.x.squeeze(1).tolist() == [7.0, 8.0, 9.0] and len(train) == 7
    r_train, r_val = split_validation(full, 0.3, seed=0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))  # today's seeded split, unchanged
    assert r_val is not None and torch.equal(r_val.x.squeeze(1), perm[:3].float())
    data = load_data(load_config(None, ["data.val_split=last"]).data, CPU)
    assert data.val is not None and len(data.val) == 200 and len(data.train) == 800
    from optcli.tasks.regression import load_regression

    assert torch.equal(data.val.x, load_regression(load_config(None).data).x[800:])


def test_r2_is_one_minus_sse_over_sst_averaged_over_outputs():
    y = torch.tensor([[1.0, 0.0], [2.0, 4.0], [3.0, 8.0]])
    pred = torch.tensor([[1.5, 0.0], [2.0, 4.0], [2.5, 4.0]])
    sse = (pred - y).square().sum(0)
    want = ((1 - 0.5 / 2.0) + (1 - 16.0 / 32.0)) / 2  # SST per output: 2 and 32
    assert r2_score(sse, y) == pytest.approx(want, rel=1e-12)
    assert r2_score(torch.zeros(1), torch.ones(3, 1)) is None  # a constant target has no R²


def test_val_r2_is_reported_and_drives_early_stopping_and_targets(tmp_path):
    refused = cli("compare", "adam", "--target", "val_accuracy=0.9")
    assert_user_error(
        refused, "--target val_accuracy=0.9: data.name=regression (regression) has no val_accuracy", tmp_path
    )
    stop = "train.early_stopping={metric: val_r2, patience: 2}"
    result = cli("train", "--set", stop, "--set", "train.epochs=3", "--set", "name=r", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    r2 = [r["val_r2"] for r in rows]
    assert all(-1 < v < 1 for v in r2) and r2[-1] > r2[0]  # Adam improves the fit within three epochs
    assert load_config(None, [stop]).train.early_stopping.maximize
    compare = cli("compare", "adam", "--seeds", "1", "--set", "train.epochs=3", "--target", "val_r2=-5", "--json")
    assert compare.exit_code == 0, compare.output
    row = json.loads(compare.stdout)["rows"][0]
    assert row["val_r2"] == pytest.approx(max(r2), rel=1e-6)  # the best epoch's: lowest MSE is highest R²


# --- the data-file task -----------------------------------------------------------------------------------------


def _blobs(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 4)) + 3 * y[:, None] + 100  # offset: standardization matters
    return x, y


def _file_config(tmp_path: Path, data_file: str, **data) -> str:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    raw = {"data": {"name": "file", "path": data_file, "batch_size": 16, **data}, "train": {"epochs": 4}}
    (folder / "f.yaml").write_text(yaml.safe_dump(raw))
    return str(folder / "f.yaml")


@pytest.mark.parametrize("fmt", ["csv", "npy", "npz"])
def test_train_on_a_data_file_of_each_format(fmt, tmp_path):
    x, y = _blobs()
    folder = tmp_path / "cfg"
    folder.mkdir()
    if fmt == "csv":
        lines = ["a,b,c,d,label"] + [",".join([*map(str, row), str(k)]) for row, k in zip(x, y, strict=True)]
        (folder / "d.csv").write_text("\n".join(lines) + "\n")
    elif fmt == "npy":
        np.save(folder / "d.npy", np.column_stack([x, y]))  # floats: data.task says the last column is classes
    else:
        np.savez(folder / "d.npz", x=x, y=y)
    extra = {"task": "classification"} if fmt == "npy" else {}
    result = cli(
        "train", "-c", _file_config(tmp_path, f"d.{fmt}", **extra), "--set", "name=f", "--set", "optimizer.lr=0.05"
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "runs" / "f" / "metrics.csv").open()))
    assert float(rows[-1]["val_accuracy"]) > 0.9


def test_file_features_are_standardized_by_the_training_split_alone(tmp_path):
    x, y = _blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.float64))  # float targets: regression
    cfg = load_config(_file_config(tmp_path, str(tmp_path / "d.npz"), val_split="last"))
    task = get_task(cfg.data)
    assert task.kind is Kind.REGRESSION and task.default_loss == "mse" and task.shapes() == (4, 1)
    data = load_data(cfg.data, CPU)
    assert data.val is not None and data.train.y.shape == (72, 1)
    assert data.train.x.mean(0).abs().max() < 1e-4 and (data.train.x.std(0, correction=0) - 1).abs().max() < 1e-4
    train_raw = torch.from_numpy(x[:72]).float()
    want_val = (torch.from_numpy(x[72:]).float() - train_raw.mean(0)) / train_raw.std(0, correction=0)
    assert torch.allclose(data.val.x, want_val, atol=1e-5)


def test_compare_on_the_bundled_wine_example(repo_root, tmp_path):
    result = cli("compare", "sgd", "adam", "-c", repo_root / "configs/examples/wine.yaml",
                 "--seeds", "1", "--set", "train.epochs=2", "--set", "name=w")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "w" / "summary.json").read_text())
    assert summary["task"] == "classification"


@pytest.mark.parametrize(
    ("write", "data", "fragment"),
    [
        (lambda p: p.write_text("a,y\n1,0\nnan,1\n"), {}, "d.csv"),
        (lambda p: p.write_text("a,y\n1,0\n2\n"), {}, "d.csv"),
        (lambda p: p.write_text(""), {}, "d.csv: is empty"),
        (lambda p: p.write_text("a,y\n1,0\n2,1\n"), {"target_column": "label"}, "data.target_column 'label'"),
        (lambda p: None, {}, "does not exist"),
        (lambda p: p.write_text("a,y\n1,0\n2,1\n"), {"task": "ordinal"}, "data.task: must be classification or "),
    ],
)
def test_bad_data_files_are_one_line_and_write_nothing(write, data, fragment, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    write(folder / "d.csv")
    assert_user_error(cli("train", "-c", _file_config(tmp_path, "d.csv", **data)), fragment, tmp_path)


def test_file_task_needs_a_path(tmp_path):
    assert_user_error(cli("train", "--set", "data.name=file"), "data.path: data.name=file needs the file", tmp_path)
