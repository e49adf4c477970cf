"""compare --vectorize on a user's own model: its seeds stacked through torch.func compute what the plain path
computes, and a model whose results would differ under vmap (dropout, batch norm, data-dependent Python) runs the
plain path with one line saying why."""

from __future__ import annotations

import pytest
import torch
import yaml

from optcli.compare.comparison import run_comparison
from optcli.compare.options import CompareOptions
from optcli.config import load_config
from optcli.engine.build import build_model_and_optimizer
from optcli.engine.functional_stack import FunctionalStack
from optcli.engine.stacked import build_stacked_model, retire
from optcli.tasks import load_data
from tests.conftest import cli, importable_module, mnist_args
from tests.test_vectorized import _assert_histories_close

MODEL_PY = '''
import torch
from torch import nn
import torch.nn.functional as F


class TwoLayer(nn.Module):
    """A constant buffer and a frozen-able body: every kind of tensor a module registers."""

    def __init__(self, in_features, out_features, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
        self.head = nn.Linear(width, out_features)
        self.register_buffer("scale", torch.full((out_features,), 0.5))

    def forward(self, x):
        return self.head(self.body(x)) * self.scale


def conv(num_classes):
    """Image tasks: a convolution on the rows seen as (1, 28, 28) images."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 3, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(192, num_classes)
    )


class Dropping(TwoLayer):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.2, self.training)


def normed(in_features, out_features):
    return nn.Sequential(nn.Linear(in_features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, out_features))


class Branching(TwoLayer):
    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else -super().forward(x)
'''


@pytest.fixture(autouse=True)
def user_module(tmp_path):
    yield from importable_module(tmp_path / "models", "vmapmodels", MODEL_PY)


def user_sets(name: str = "TwoLayer", *extra: str) -> list[str]:
    return [f"model.name=vmapmodels:{name}", "model.path=models", "data.samples=96", "data.batch_size=24", *extra]


def test_a_user_models_stacked_initial_weights_are_each_seeds_plain_ones():
    cfg = load_config(None, user_sets("TwoLayer", "model.kwargs={width: 5}", "model.init=xavier_uniform"))
    data = load_data(cfg.data, torch.device("cpu"))
    stacked = build_stacked_model(cfg, data, [3, 7])
    assert isinstance(stacked, FunctionalStack)
    for i, seed in enumerate((3, 7)):
        model, _, _ = build_model_and_optimizer(cfg.model_copy(update={"seed": seed}), data, torch.device("cpu"))
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            assert torch.equal(stacked.get_parameter(name)[i] if "scale" not in name else stacked.scale[i], p), name
    assert [n for n, _ in stacked.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_a_user_model_stacked_through_torch_func_matches_the_plain_path_on_every_epoch():
    # frozen parameters and a param group by the model's own names apply to the stack as to each plain model
    extra = ["train.epochs=6", "data.val_fraction=0.25", "model.freeze=['body.0.bias']"]
    extra += ["optimizer.groups=[{params: ['head.*'], weight_decay: 0.01}]"]
    cfg = load_config(None, user_sets("TwoLayer", *extra))
    specs = ["sgd:lr=0.05,momentum=0.9", "adam:lr=0.01", "rmsprop:lr=0.001"]
    plain = run_comparison(cfg, specs, CompareOptions(seeds=3, threads=1))
    vec = run_comparison(cfg, specs, CompareOptions(seeds=3, threads=1, vectorize=True))
    assert vec.notes == [f"--vectorize: {s} stacks its 3 seeds through torch.func" for s in specs]
    _assert_histories_close(vec, plain)


def test_a_convolutional_user_model_on_images_matches_the_plain_path(tiny_mnist):
    items = [a for a in mnist_args(tiny_mnist, "--set", "train.epochs=2") if a != "--set" and "hidden" not in a]
    cfg = load_config(None, [*items, "model.name=vmapmodels:conv", "model.path=models"])
    plain = run_comparison(cfg, ["adam"], CompareOptions(seeds=2, threads=1))
    vec = run_comparison(cfg, ["adam"], CompareOptions(seeds=2, threads=1, vectorize=True))
    assert vec.notes == ["--vectorize: adam stacks its 2 seeds through torch.func"]
    _assert_histories_close(vec, plain)


def test_retiring_a_seed_slices_the_parameters_and_buffers_of_a_functional_stack():
    cfg = load_config(None, user_sets())
    data = load_data(cfg.data, torch.device("cpu"))
    stack = build_stacked_model(cfg, data, [0, 1, 2])
    opt = torch.optim.Adam(stack.parameters())
    stack(data.train.x[:4].expand(3, 4, -1)).sum().backward()
    opt.step()
    head = stack.get_parameter("head.weight").detach().clone()
    retire(stack, opt, [0, 2])
    assert torch.equal(stack.get_parameter("head.weight"), head[[0, 2]])
    assert stack.scale.shape == (2, 1) and opt.state[stack.get_parameter("head.weight")]["exp_avg"].shape[0] == 2
    assert stack(data.train.x[:4].expand(2, 4, -1)).shape == (2, 4, 1)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Dropping", "model.name vmapmodels:Dropping draws random numbers in training (dropout?)"),
        ("normed", "model.name vmapmodels:normed has batch norm (1)"),
        ("Branching", "model.name vmapmodels:Branching does not run under torch.vmap"),
    ],
)
def test_a_user_model_whose_result_vmap_would_change_runs_the_plain_path(name, reason):
    cfg = load_config(None, user_sets(name, "train.epochs=2"))
    vec = run_comparison(cfg, ["adam"], CompareOptions(seeds=2, threads=1, vectorize=True))
    plain = run_comparison(cfg, ["adam"], CompareOptions(seeds=2, threads=1))
    assert len(vec.notes) == 1 and vec.notes[0].startswith(f"--vectorize: adam runs its seeds one by one: {reason}")
    for tv, tp in zip(vec.trials, plain.trials, strict=True):
        assert [e.train_loss for e in tv.history.epochs] == [e.train_loss for e in tp.history.epochs]


def test_cli_compare_vectorize_stacks_a_user_model(tmp_path):
    path = tmp_path / "user.yaml"
    model = {"name": "vmapmodels:TwoLayer", "path": "models", "kwargs": {"width": 6}}
    path.write_text(yaml.safe_dump({"model": model, "data": {"samples": 96}, "train": {"epochs": 2}}))
    result = cli("compare", "sgd", "adam", "-c", str(path), "--seeds", "3", "--vectorize", "--set", "name=v")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "--vectorize: sgd stacks its 3 seeds through torch.func" in flat
    assert "--vectorize: adam stacks its 3 seeds through torch.func" in flat
    assert "one by one" not in flat
