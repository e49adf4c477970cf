import json
import math

import pytest
import torch

from optcli.config import load_config
from optcli.engine.build import build_model_and_optimizer
from optcli.engine.loop import Training, fit
from optcli.lr_find import lr_find, lr_schedule, smooth, suggest
from optcli.tasks import Data, Split
from tests.conftest import assert_user_error, cli


def test_schedule_is_exponential_from_min_to_max():
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == 1e-6 and lrs[-1] == pytest.approx(1.0, rel=1e-12)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(r == pytest.approx(10.0, rel=1e-9) for r in ratios)  # six decades in six steps


def test_smoothing_is_bias_corrected():
    # without the correction the first values would be pulled towards zero: 0.02 * 5 = 0.1 at step 1
    assert smooth([5.0] * 10, 0.98) == pytest.approx([5.0] * 10, rel=1e-12)
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_steepest_rule_finds_the_fastest_fall_and_minimum_rule_divides_by_ten():
    lrs = lr_schedule(1e-6, 1.0, 61)
    # a loss that falls fastest (per decade) at lr = 1e-3, bottoms out near 1e-1, then rises
    losses = [2 - math.tanh(2 * (math.log10(lr) + 3)) + (10 * lr) ** 2 for lr in lrs]
    i = suggest(lrs, losses, "steepest")
    assert i is not None and lrs[i] == pytest.approx(1e-3, rel=0.13)  # the grid has 10 points per decade
    lowest = min(range(len(losses)), key=lambda k: losses[k])
    j = suggest(lrs, losses, "minimum")
    assert j is not None and lrs[j] == pytest.approx(lrs[lowest] / 10, rel=0.13)


def test_a_flat_curve_too_short_to_judge_gives_no_suggestion():
    assert suggest([1e-3, 1e-2], [1.0, 1.0], "steepest") is None


def test_cli_prints_suggestion_writes_plot_and_json_and_touches_no_run(tmp_path):
    result = cli("lr-find", "--steps", "40", "--min-lr", "1e-6", "--max-lr", "100", "--plot", "lrf.png", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["optimizer"] == "Adam" and r["stopped"] == "diverged"  # lr 100 blows Adam up on this task
    assert len(r["lrs"]) == len(r["losses"]) == len(r["smoothed"]) < 40
    assert r["lrs"] == sorted(r["lrs"]) and r["suggestion"] == r["lrs"][r["suggestion_index"]]
    assert max(r["smoothed"]) > 4 * min(r["smoothed"])  # it stopped because of the divergence rule
    assert (tmp_path / "lrf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "runs").exists()
    text = cli("lr-find", "--optimizer", "sgd", "--steps", "30", "--rule", "minimum")
    assert text.exit_code == 0, text.output
    assert "suggested lr" in text.output and "divided by 10" in text.output and "SGD" in text.output
    assert (tmp_path / "lr_find.png").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--min-lr", "1", "--max-lr", "0.1"], "--min-lr/--max-lr"),
        (["--steps", "2"], "--steps"),
        (["--rule", "valley"], "--rule"),
        (["--optimizer", "sgd:momentun=0.9"], "momentun"),
        (["--plot", "no/such/dir/x.png"], "--plot"),
    ],
)
def test_bad_input_is_one_line(args, fragment, tmp_path):
    assert_user_error(cli("lr-find", *args), fragment, tmp_path)
    assert not list(tmp_path.glob("*.png"))


def teacher_regression(n: int = 1200, d_in: int = 20, noise: float = 0.5) -> Data:
    """A regression with signal (a fixed random tanh teacher plus noise), split 1000 / 200: validation loss can
    only fall by learning the teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    signal = torch.tanh(x @ torch.randn(d_in, 32, generator=g) / d_in**0.5) @ torch.randn(32, 1, generator=g)
    y = signal / signal.std() + noise * torch.randn(n, 1, generator=g)
    return Data(Split(x[:1000], y[:1000]), Split(x[1000:], y[1000:]), None, "regression", d_in, 1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_at_the_suggestion_lowers_validation_loss_faster_than_100x_or_a_hundredth(optimizer):
    overrides = ["data.batch_size=32", "train.reduction=mean", "model.hidden=[64]", "train.epochs=3"]
    cfg = load_config(None, [*overrides, f"optimizer.name={optimizer}", "data.inputs=20", "data.outputs=1"])
    data = teacher_regression()
    suggestion = lr_find(cfg, data=data).suggestion
    assert suggestion is not None
    val = {}
    for factor in (0.01, 1.0, 100.0):
        run = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lr": suggestion * factor})})
        model, opt, sched = build_model_and_optimizer(run, data, torch.device("cpu"))
        history = fit(Training(run, model, opt, sched, data))
        last = history.epochs[-1].val_loss
        val[factor] = last if history.status == "completed" and last is not None else math.inf
    assert val[1.0] < val[0.01] and val[1.0] < val[100.0], (suggestion, val)
