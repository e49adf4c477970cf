"""A user's model by import path (model.name: module:factory, model.kwargs, model.path) through train, resume,
compare, inspect-params and lr-find, and every bad-input line it can give."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from optcli.config import load_config
from optcli.engine.build import build_model_and_optimizer
from optcli.rundir.files import load_checkpoint
from optcli.tasks import load_data
from tests.conftest import assert_user_error, cli, importable_module

MODEL_PY = '''
import torch
from torch import nn


class TwoLayer(nn.Module):
    """Takes in_features and out_features by name; width comes from model.kwargs."""

    def __init__(self, in_features, out_features, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
        self.head = nn.Linear(width, out_features)

    def forward(self, x):
        return self.head(self.body(x))


def make(in_features, out_features, width=8):
    return TwoLayer(in_features, out_features, width)


def shapes(input_shape, num_classes):
    """Image tasks: input_shape and num_classes by name."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))


def wrong_width(in_features):
    return nn.Linear(in_features, 3)


def raises(in_features):
    raise ValueError("width must be even")


def not_a_module():
    return 42
'''


@pytest.fixture(autouse=True)
def user_module(tmp_path):
    """usermodels.py in its own folder, imported fresh by every test (and forgotten after it)."""
    yield from importable_module(tmp_path / "models", "usermodels", MODEL_PY)


def config(tmp_path, name="usermodels:TwoLayer", **model) -> str:
    """A config file in tmp_path/cfg/ whose model.path is relative to it: ../models."""
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    path = folder / "user.yaml"
    raw = {
        "model": {"name": name, "path": "../models", "kwargs": {"width": 6}, **model},
        "data": {"samples": 120, "batch_size": 32},
        "train": {"epochs": 3},
    }
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_train_resolves_the_path_from_the_config_folder_and_saves_it_absolute(tmp_path):
    result = cli("train", "-c", config(tmp_path), "--set", "name=u")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "runs" / "u" / "config.yaml").read_text())
    assert saved["model"]["path"] == str(tmp_path / "models")
    weights = load_checkpoint(tmp_path / "runs" / "u" / "last.pt")["model"]
    assert weights["body.0.weight"].shape == (6, 20) and weights["head.weight"].shape == (1, 6)
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "u" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]["dynamics"]["layers"]) == {"body.0", "head"}  # per layer, by the module's own names


def test_the_factory_is_called_under_the_seed(tmp_path):
    cfg = load_config(config(tmp_path))
    device = torch.device("cpu")
    data = load_data(cfg.data, device)
    a, _, _ = build_model_and_optimizer(cfg, data, device)
    b, _, _ = build_model_and_optimizer(cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy()}), data, device)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    other, _, _ = build_model_and_optimizer(load_config(config(tmp_path), ["seed=1"]), data, device)
    assert not torch.equal(other.state_dict()["head.weight"], a.state_dict()["head.weight"])


def test_resume_of_a_user_model_matches_one_go(tmp_path):
    path = config(tmp_path)
    assert cli("train", "-c", path, "--set", "train.epochs=4", "--set", "name=whole").exit_code == 0
    assert cli("train", "-c", path, "--set", "train.epochs=2", "--set", "name=part").exit_code == 0
    result = cli("train", "--resume", tmp_path / "runs" / "part", "--set", "train.epochs=4")
    assert result.exit_code == 0, result.output
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt")["model"] for n in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compare_gives_every_optimizer_the_same_start_and_stacks_it_with_vectorize(tmp_path):
    result = cli("compare", "sgd", "adam", "-c", config(tmp_path), "--seeds", "2", "--vectorize", "--set", "name=c")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "--vectorize: sgd stacks its 2 seeds through torch.func" in flat  # tests/test_vectorized_any_model.py
    summary = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert {(t["label"], t["seed"]) for t in summary["trials"]} == {(o, s) for o in ("sgd", "adam") for s in (0, 1)}
    assert all(t["status"] == "completed" for t in summary["trials"])


def test_compare_jobs_workers_import_the_model_from_model_path(tmp_path):
    result = cli("compare", "sgd", "adam", "-c", config(tmp_path), "--jobs", "2", "--set", "name=j")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "j" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["completed"] * 6


def test_inspect_params_shows_the_user_model_with_init_and_freeze(tmp_path):
    extra = ("--set", "model.freeze=['body.*']", "--set", "model.init=zeros")
    result = cli("inspect-params", "-c", config(tmp_path), *extra, "--json")
    assert result.exit_code == 0, result.output
    params = {p["name"]: p for p in json.loads(result.stdout)["params"]}
    assert set(params) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}
    assert not params["body.0.weight"]["requires_grad"] and params["head.weight"]["requires_grad"]
    cfg = load_config(config(tmp_path), ["model.init=zeros"])
    model, _, _ = build_model_and_optimizer(cfg, load_data(cfg.data, torch.device("cpu")), torch.device("cpu"))
    assert all(not bool(p.any()) for p in model.parameters())  # zeros on weights, biases zeroed


def test_a_function_factory_with_image_shapes_by_name(tmp_path, tiny_mnist):
    extra = ["--set", "data.name=mnist", "--set", f"data.root={tiny_mnist}", "--set", "data.download=false"]
    result = cli("train", "-c", config(tmp_path, "usermodels:shapes", kwargs={}), *extra, "--set", "name=m")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "runs" / "m" / "last.pt")["model"]["1.weight"].shape == (10, 784)


def test_lr_find_runs_on_a_user_model(tmp_path):
    result = cli("lr-find", "-c", config(tmp_path), "--steps", "20", "--plot", tmp_path / "lr.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ({"name": "nosuchmodule:make"}, "model.name: cannot import nosuchmodule (ModuleNotFoundError"),
        ({"name": "usermodels:missing"}, "model.name: usermodels has no missing"),
        ({"name": "usermodels:raises", "kwargs": {}}, "model.name: usermodels:raises(in_features) raised ValueError"),
        ({"name": "usermodels:not_a_module", "kwargs": {}}, "returned a int, not a torch.nn.Module"),
        ({"name": "usermodels:wrong_width", "kwargs": {}}, "gives outputs of shape (2, 3) for a batch of 2"),
        ({"name": "usermodels:make", "kwargs": {"depth": 2}}, "model.name: usermodels:make(in_features, out_feat"),
        ({"name": "usermodels", "kwargs": {}}, "model.name: must be mlp or an import path pkg.module:factory"),
        ({"hidden": [8]}, "model.hidden: applies to the built-in MLP only; model.name is usermodels:TwoLayer"),
        ({"dropout": 0.5}, "model.dropout: applies to the built-in MLP only"),
        ({"path": "../nowhere"}, "model.path:"),
        ({"name": "mlp"}, "model.kwargs: are a user's factory's keywords"),
    ],
)
def test_bad_user_models_are_one_line_and_write_nothing(tmp_path, model, fragment):
    name = model.pop("name", "usermodels:TwoLayer")
    result = cli("train", "-c", config(tmp_path, name, **model))
    assert_user_error(result, fragment, tmp_path)
    assert len(result.output.strip().splitlines()) == 1


def test_compare_refuses_a_bad_user_model_before_any_trial(tmp_path):
    result = cli("compare", "sgd", "adam", "-c", config(tmp_path, "usermodels:wrong_width", kwargs={}))
    assert_user_error(result, "gives outputs of shape (2, 3)", tmp_path)


def test_a_function_task_keeps_its_own_model(tmp_path):
    result = cli("train", "--set", "data.name=function", "--set", "model.name=usermodels:make")
    assert_user_error(result, "model.name: data.name=function trains its own model", tmp_path)
