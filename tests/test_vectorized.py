"""compare --vectorize: the seeds of an optimizer stacked into one model compute what the plain path computes."""

from __future__ import annotations

import math

import pytest
import torch

from optcli.compare.comparison import run_comparison
from optcli.compare.options import CompareOptions
from optcli.config import load_config
from optcli.engine import stacked
from optcli.engine.build import build_model_and_optimizer, seed_torch
from optcli.engine.model import Dropout
from optcli.engine.stacked import StackedDropout, build_stacked_model, elementwise_optimizers, retire
from optcli.tasks import load_data
from tests.conftest import assert_user_error, cli, mnist_args

# Per step, the stacked and the plain path run the same float32 operations on the same values, except the order of
# a few sums: torch.bmm and torch.mm may split a weight gradient's sum over the batch (B <= 64 terms) differently.
# A sum of B float32 terms reordered moves by at most about B * 2**-24 ~ 4e-6 of the sum of their magnitudes
# (Higham's bound gamma_B); over the T <= 12 optimizer steps of these short runs, far from any instability, such
# perturbations add up rather than grow: T * 4e-6 ~ 5e-5 relative. RTOL leaves 2x on top of that bound.
RTOL = 1e-4


def _step_stacked_and_apart(cls, kwargs, steps=3, seeds=3):
    """One optimizer over a stacked (seeds, 4, 5) tensor against one optimizer per slice, on the same gradients."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(seeds, 4, 5, generator=g)
    grads = [torch.randn(seeds, 4, 5, generator=g) for _ in range(steps)]
    stacked = torch.nn.Parameter(init.clone())
    apart = [torch.nn.Parameter(init[s].clone()) for s in range(seeds)]
    opt_stacked = cls([stacked], **kwargs)
    opts_apart = [cls([p], **kwargs) for p in apart]
    for grad in grads:
        stacked.grad = grad.clone()
        opt_stacked.step()
        for s, (p, opt) in enumerate(zip(apart, opts_apart, strict=True)):
            p.grad = grad[s].clone()
            opt.step()
    return stacked.detach(), torch.stack([p.detach() for p in apart])


@pytest.mark.parametrize("cls", elementwise_optimizers(), ids=lambda c: c.__name__)
def test_every_listed_optimizer_updates_elementwise(cls):
    kwargs = {"lr": 0.01, "weight_decay": 0.1} if cls.__name__ != "Rprop" else {"lr": 0.01}
    stacked, apart = _step_stacked_and_apart(cls, kwargs)
    # the same elementwise float32 operations per entry; vectorized kernels may fuse a multiply-add differently in
    # a tensor's tail than in its body, a few ulps per step: 1e-6 relative is far below any cross-slice mixing
    torch.testing.assert_close(stacked, apart, rtol=1e-6, atol=1e-7)


def test_the_property_catches_an_optimizer_with_per_tensor_statistics():
    """Adafactor factors second moments over a tensor's rows and columns: stacking would mix the seeds."""
    stacked, apart = _step_stacked_and_apart(torch.optim.Adafactor, {"lr": 0.01})
    assert not torch.allclose(stacked, apart, rtol=1e-3)
    assert torch.optim.Adafactor not in elementwise_optimizers()


def test_stacked_dropout_draws_the_plain_paths_masks_per_seed():
    x = torch.ones(3, 16, 40)
    stacked = StackedDropout(0.5, [torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    plain = Dropout(0.5)
    out = [stacked(x), stacked(x)]  # two forward passes: the streams advance as the plain path's do
    for i, seed in enumerate((4, 5, 6)):
        seed_torch(seed)
        first, second = plain(x[i]), plain(x[i])
        assert torch.equal(out[0][i], first) and torch.equal(out[1][i], second)
    assert not torch.equal(out[0][0], out[0][1])


def test_stacked_initial_weights_are_each_seeds_plain_ones():
    cfg = load_config(None, ["data.samples=16", "model.hidden=[8,6]", "model.init=xavier_uniform"])
    data = load_data(cfg.data, torch.device("cpu"))
    stacked = build_stacked_model(cfg, data, [3, 7])
    for i, seed in enumerate((3, 7)):
        model, _, _ = build_model_and_optimizer(cfg.model_copy(update={"seed": seed}), data, torch.device("cpu"))
        for name, p in model.named_parameters():
            mine = stacked.get_parameter(name)[i]
            # held transposed (in, out), the bias as a row (1, out)
            assert torch.equal(mine.t() if name.endswith("weight") else mine.squeeze(0), p.detach()), name


def test_a_retired_seed_stops_and_the_others_go_on_as_alone():
    """Adam moves a parameter even with a zero gradient: retiring removes the slice and its state instead."""
    g = torch.Generator().manual_seed(1)
    init, grads = torch.randn(3, 5, generator=g), [torch.randn(3, 5, generator=g) for _ in range(4)]
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(init.clone())
    model.keep = lambda index: setattr(model.w, "data", model.w.data[index])  # StackedMLP.keep for one tensor
    opt = torch.optim.Adam([model.w], lr=0.1)
    alone = torch.nn.Parameter(init[2].clone())
    opt_alone = torch.optim.Adam([alone], lr=0.1)
    for step, grad in enumerate(grads):
        if step == 2:
            retire(model, opt, [2])  # type: ignore[arg-type]  # seeds 0 and 1 finished
        model.w.grad = grad[2:] if step >= 2 else grad.clone()
        opt.step()
        alone.grad = grad[2].clone()
        opt_alone.step()
    assert model.w.shape == (1, 5)
    torch.testing.assert_close(model.w.detach()[0], alone.detach(), rtol=1e-6, atol=1e-7)


def _assert_histories_close(vec, plain) -> None:
    for tv, tp in zip(vec.trials, plain.trials, strict=True):
        assert (tv.label, tv.seed, tv.history.status) == (tp.label, tp.seed, tp.history.status)
        assert tv.history.diverged_at == tp.history.diverged_at
        assert len(tv.history.epochs) == len(tp.history.epochs)
        for ev, ep in zip(tv.history.epochs, tp.history.epochs, strict=True):
            assert ev.lr == ep.lr and ev.steps == ep.steps  # optimizer steps counted as a plain trial counts them
            if ep.dynamics is not None:  # train.dynamics (on by default): measured per seed on its slices
                assert ev.dynamics["state_bytes"] == ep.dynamics["state_bytes"]
                assert ev.dynamics["layers"].keys() == ep.dynamics["layers"].keys()
                for layer, d in ep.dynamics["layers"].items():
                    # a norm of gradients that carry the perturbation argued at RTOL; 10x for the loss surface
                    # turning a relative change of the weights into a larger one of a small gradient
                    got, want = ev.dynamics["layers"][layer]["grad_norm"], d["grad_norm"]
                    assert got == want if want is None else got == pytest.approx(want, rel=10 * RTOL)
                    # the others divide the weights' change, w_after - w_before: the weights' perturbation
                    # relative to that change is 1 / (the change's ratio to the weights) times larger
                    for key, ratio in (
                        ("update_ratio", "update_ratio"),
                        ("step_size", "update_ratio"),
                        ("epoch_update_ratio", "epoch_update_ratio"),
                    ):
                        got, want = ev.dynamics["layers"][layer].get(key), d.get(key)
                        if want is None or not d[ratio]:
                            assert got == want, key
                        else:
                            assert got == pytest.approx(want, rel=10 * RTOL * (1 + 1 / d[ratio])), key
            for key in ("train_loss", "val_loss"):
                a, b = getattr(ev, key), getattr(ep, key)
                assert (a is None) == (b is None), key
                if a is not None and math.isfinite(b):
                    assert a == pytest.approx(b, rel=RTOL), (tv.label, tv.seed, ev.epoch, key)
                elif a is not None:
                    assert not math.isfinite(a)


def test_vectorized_comparison_matches_the_plain_one_on_every_epoch_metric():
    cfg = load_config(None, ["train.epochs=6", "data.samples=48", "data.batch_size=24", "data.val_fraction=0.25"])
    specs = ["sgd:lr=0.001,momentum=0.9", "adam:lr=0.01", "rmsprop:lr=0.001", "adamw:lr=0.01,weight_decay=0.1"]
    plain = run_comparison(cfg, specs, CompareOptions(seeds=3, threads=1))
    vec = run_comparison(cfg, specs, CompareOptions(seeds=3, threads=1, vectorize=True))
    assert vec.notes == []
    _assert_histories_close(vec, plain)
    assert [r["label"] for r in vec.rows] == [r["label"] for r in plain.rows]


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "tanh"])
def test_every_activation_stacks_to_the_plain_result(activation):
    # ReLU-like activations run in place on the batched matmul's output when stacked: the same values
    extra = [f"model.activation={activation}", "model.hidden=[16,8]", "train.epochs=4", "data.samples=48"]
    cfg = load_config(None, [*extra, "data.batch_size=24", "data.val_fraction=0.25"])
    plain = run_comparison(cfg, ["adam:lr=0.01"], CompareOptions(seeds=2, threads=1))
    vec = run_comparison(cfg, ["adam:lr=0.01"], CompareOptions(seeds=2, threads=1, vectorize=True))
    assert vec.notes == []
    _assert_histories_close(vec, plain)


def test_batches_gathered_once_per_epoch_are_the_per_batch_ones(monkeypatch):
    # a small split is gathered once per epoch and sliced; a large one gathered batch by batch: the same batches
    cfg = load_config(None, ["data.samples=50", "data.val_fraction=0.2"])
    split = load_data(cfg.data, torch.device("cpu")).train
    perms = torch.stack([torch.randperm(len(split), generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)])
    sliced = list(stacked._batches(split, 16, perms))  # 40 rows, batches of 16, 16, 8
    monkeypatch.setattr(stacked, "EPOCH_GATHER_BYTES", 0)
    gathered = list(stacked._batches(split, 16, perms))
    assert [x.shape for x, _ in sliced] == [(3, 16, 20), (3, 16, 20), (3, 8, 20)]
    for (xs, ys), (xg, yg) in zip(sliced, gathered, strict=True):
        assert torch.equal(xs, xg) and torch.equal(ys, yg)
    for s in range(3):  # each seed's rows in its own order
        assert torch.equal(torch.cat([x[s] for x, _ in sliced]), split.x[perms[s]])


def test_vectorized_mnist_with_dropout_accumulation_and_a_schedule(tiny_mnist):
    extra = ["--set", "model.dropout=0.3", "--set", "train.accumulate=2", "--set", "train.epochs=3"]
    extra += ["--set", "scheduler={name: steplr, step_size: 1, gamma: 0.5}"]
    items = [a for a in mnist_args(tiny_mnist, *extra) if a != "--set"]
    cfg = load_config(None, items)
    plain = run_comparison(cfg, ["adam", "sgd:momentum=0.9"], CompareOptions(seeds=2, threads=1))
    vec = run_comparison(cfg, ["adam", "sgd:momentum=0.9"], CompareOptions(seeds=2, threads=1, vectorize=True))
    _assert_histories_close(vec, plain)
    for tv, tp in zip(vec.trials, plain.trials, strict=True):
        # an accuracy moves only when a logit margin is within the perturbation above: at most one sample here
        for ev, ep in zip(tv.history.epochs, tp.history.epochs, strict=True):
            assert abs(ev.val_accuracy - ep.val_accuracy) <= 1 / 60 + 1e-9
        assert abs(tv.history.test_accuracy - tp.history.test_accuracy) <= 1 / 100 + 1e-9


def test_a_per_step_schedule_steps_the_stacked_seeds_as_it_steps_a_plain_trial():
    sets = ["train.epochs=3", "data.samples=48", "data.batch_size=8", "scheduler={name: onecyclelr, max_lr: 0.01}"]
    cfg = load_config(None, sets)
    plain = run_comparison(cfg, ["sgd:momentum=0.9", "adam"], CompareOptions(seeds=2, threads=1))
    vec = run_comparison(cfg, ["sgd:momentum=0.9", "adam"], CompareOptions(seeds=2, threads=1, vectorize=True))
    assert vec.notes == []
    _assert_histories_close(vec, plain)  # the lr of every epoch's first step included


def test_gradient_clipping_clips_each_seeds_own_norm_as_the_plain_path_does():
    # a max_norm well below these gradients' norms, so every step clips, each seed by its own coefficient
    cfg = load_config(None, ["train.epochs=4", "data.samples=48", "data.batch_size=16", "train.grad_clip=0.05"])
    plain = run_comparison(cfg, ["sgd:lr=0.1,momentum=0.9", "adam"], CompareOptions(seeds=3, threads=1))
    vec = run_comparison(cfg, ["sgd:lr=0.1,momentum=0.9", "adam"], CompareOptions(seeds=3, threads=1, vectorize=True))
    assert vec.notes == []
    _assert_histories_close(vec, plain)
    unclipped = run_comparison(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_clip": None})}),
        ["sgd:lr=0.1,momentum=0.9"],
        CompareOptions(seeds=1, threads=1),
    )
    clipped = next(t for t in plain.trials if t.label.startswith("sgd") and t.seed == 0)
    assert unclipped.trials[0].history.epochs[-1].train_loss != pytest.approx(
        clipped.history.epochs[-1].train_loss, rel=1e-2
    )  # the clip did act


def test_a_seed_that_diverges_first_is_retired_and_the_rest_match():
    # lr 0.005 on this task: seed 3 diverges in epoch 4, seeds 0-2 in epoch 5 (the plain path's record)
    tutorial = ["data.target=random", "data.inputs=1000", "data.outputs=10", "data.val_fraction=0"]
    tutorial += ["model.hidden=[100]", "train.reduction=sum"]  # the task this record was taken on
    cfg = load_config(None, ["train.epochs=8", "data.samples=32", "data.batch_size=16", *tutorial])
    plain = run_comparison(cfg, ["sgd:lr=0.005"], CompareOptions(seeds=4, threads=1))
    vec = run_comparison(cfg, ["sgd:lr=0.005"], CompareOptions(seeds=4, threads=1, vectorize=True))
    epochs = {t.seed: t.history.diverged_at["epoch"] for t in plain.trials if t.history.diverged_at}
    assert len(set(epochs.values())) > 1, "the test needs seeds diverging in different epochs"
    _assert_histories_close(vec, plain)


@pytest.mark.parametrize(
    ("spec", "sets", "reason"),
    [
        ("lbfgs", [], "not on the elementwise list"),
        ("adam", ["model.batch_norm=true"], "batch_norm"),
        ("adam", ["scheduler={name: reducelronplateau}"], "ReduceLROnPlateau"),
        ("adam", ["train.early_stopping={metric: train_loss, patience: 1}"], "early_stopping"),
        ("adam", ["train.precision=bf16"], "precision"),
    ],
)
def test_where_stacking_would_change_the_result_the_plain_path_runs(spec, sets, reason):
    cfg = load_config(None, ["train.epochs=2", "data.samples=16", *sets])
    vec = run_comparison(cfg, [spec], CompareOptions(seeds=2, threads=1, vectorize=True))
    plain = run_comparison(cfg, [spec], CompareOptions(seeds=2, threads=1))
    assert len(vec.notes) == 1 and reason in vec.notes[0]
    for tv, tp in zip(vec.trials, plain.trials, strict=True):
        assert [e.train_loss for e in tv.history.epochs] == [e.train_loss for e in tp.history.epochs]


def test_cli_vectorize_refuses_jobs_then_prints_its_fallback(tmp_path):
    assert_user_error(cli("compare", "adam", "--vectorize", "--jobs", "2"), "--vectorize", tmp_path)
    assert_user_error(cli("compare", "adam", "--backend", "slurm"), "--backend", tmp_path)
    result = cli("compare", "adam", "lbfgs", "--vectorize", "--seeds", "2", "--epochs", "2", "--set", "data.samples=16")
    assert result.exit_code == 0, result.output
    assert "--vectorize: lbfgs runs its seeds one by one" in result.output
    assert "adam runs" not in result.output
