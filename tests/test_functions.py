import json

import pytest
import torch

from optcli.config import DataConfig
from optcli.tasks.functions import FUNCTIONS, start_point
from tests.conftest import assert_user_error, cli

QUAD = ["--set", "data.name=function", "--set", "train.loss=value", "--set", "data.function=quadratic"]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_known_minimum_is_a_stationary_point_of_value_zero(name):
    cfg = DataConfig(name="function", function=name)
    xy = torch.tensor(FUNCTIONS[name].minimum, dtype=torch.float64, requires_grad=True)
    value = FUNCTIONS[name].fn(xy[0], xy[1], cfg)
    value.backward()
    assert abs(value.item()) < 1e-12  # float64: only rastrigin's cos(0) rounds at all
    assert xy.grad.abs().max().item() < 1e-9


def test_each_seed_jitters_the_start_and_the_same_seed_repeats_it():
    cfg = DataConfig(name="function", start=[-1.5, 2.0], start_jitter=0.1)
    a, b = start_point(cfg, 0), start_point(cfg, 1)
    assert a == start_point(cfg, 0) and a != b
    assert max(abs(a[0] + 1.5), abs(a[1] - 2.0)) < 0.5  # 0.1 * N(0, 1): five sigma
    assert start_point(cfg.model_copy(update={"start_jitter": 0.0}), 3) == [-1.5, 2.0]


def test_sgd_on_the_ill_conditioned_quadratic_follows_the_closed_form(tmp_path):
    # f = (x² + κ y²)/2 with κ = 10 and lr = 0.1: x_n = 0.9^n x_0, and the first step takes y to 0 (1 - lr κ = 0).
    # float32 rounds each step by at most 2^-24 relative: 20 steps stay within 20 * 6e-8; y_1 = 1 - fl(0.1 * 10)
    # is off by at most one ulp of 1 (2^-23 here: the product rounds up), and later steps shrink it further.
    args = [*QUAD, "--set", "data.start=[2.0,1.0]", "--set", "data.start_jitter=0", "--set", "name=q"]
    result = cli("train", *args, "--set", "optimizer.name=sgd", "--set", "optimizer.lr=0.1", "--epochs", "20")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "q" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["position"]["x"] == pytest.approx(2.0 * 0.9 ** r["epoch"], rel=r["epoch"] * 2**-23)
        assert abs(r["position"]["y"]) <= 2**-23
        assert r["position"]["distance"] == pytest.approx(abs(r["position"]["x"]), rel=1e-12)
    assert rows[0]["train_loss"] == pytest.approx((4 + 10 * 1) / 2)  # f at the start, before the first step


def test_lbfgs_and_a_scheduler_work_on_it_unchanged(tmp_path):
    result = cli("train", *QUAD, "--set", "optimizer.name=lbfgs", "--set", "optimizer.lr=1", "--epochs", "5")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["position"]["distance"] < 1e-4  # a quadratic: quasi-Newton converges in a few steps
    sched = "scheduler={name: steplr, step_size: 2, gamma: 0.5}"
    result = cli("train", *QUAD, "--set", sched, "--set", "optimizer.lr=0.1", "--epochs", "4", "--set", "name=s")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_inspect_step_shows_the_update_on_two_numbers(repo_root):
    config = repo_root / "configs" / "rosenbrock.yaml"
    args = ["inspect-params", "-c", config, "--set", "data.start_jitter=0", "--optimizer", "sgd:lr=0.001", "--step"]
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["step"]["params"]
    assert row["name"] == "xy" and row["values"]["before"] == [-1.5, 2.0]
    x, y = -1.5, 2.0
    # float32 autograd against the float64 derivative: a few roundings of 2^-24 each, no cancellation here
    assert row["values"]["grad"] == pytest.approx([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)], rel=1e-5)
    expected = [b - 0.001 * g for b, g in zip(row["values"]["before"], row["values"]["grad"], strict=True)]
    assert row["values"]["after"] == pytest.approx(expected, rel=2**-22)
    text = cli(*args)
    assert text.exit_code == 0, text.output
    assert "xy ← xy − lr·dy/dxy: [-1.5, 2] − 0.001 ×" in text.output


def test_compare_draws_trajectories_and_reports_distance_and_value(tmp_path, repo_root):
    result = cli(
        "compare",
        "sgd",
        "adam:lr=0.05",
        "-c",
        repo_root / "configs" / "rosenbrock.yaml",
        "--epochs",
        "30",
        "--seeds",
        "2",
        "--set",
        "name=r",
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "r"
    assert "distance to min" in result.output and "final f(x, y)" in result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    for seed in (0, 1):
        firsts = {t["label"]: t["epochs"][0]["train_loss"] for t in summary["trials"] if t["seed"] == seed}
        assert len(set(firsts.values())) == 1  # every optimizer of a seed starts from the same point
    for row in summary["rows"]:
        trials = [t for t in summary["trials"] if t["label"] == row["label"]]
        distances = [t["epochs"][-1]["position"]["distance"] for t in trials]
        assert row["distance_to_min"] == pytest.approx(sum(distances) / len(distances))
    assert summary["function"]["minimum"] == [1.0, 1.0]
    assert (run_dir / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "data.name=function", "--set", "train.loss=mse"], "train.loss: value goes with data.name=function"),
        (["--set", "train.loss=value"], "train.loss: value goes with data.name=function"),
        ([*QUAD, "--set", "data.start=[1,2,3]"], "data.start"),
        ([*QUAD, "--set", "data.function=himmelblau"], "data.function"),
        ([*QUAD, "--set", "data.condition=0.5"], "data.condition"),
    ],
)
def test_bad_function_settings_are_one_line(args, fragment, tmp_path):
    assert_user_error(cli("train", *args), fragment, tmp_path)


@pytest.mark.slow
def test_merged_function_comparisons_draw_trajectories_from_every_seed(tmp_path, repo_root):
    config = repo_root / "configs" / "rosenbrock.yaml"
    for seed in (0, 1):
        result = cli(
            "compare",
            "sgd",
            "adam",
            "-c",
            config,
            "--epochs",
            "5",
            "--seeds",
            "1",
            "--set",
            f"seed={seed}",
            "--set",
            f"name=s{seed}",
        )
        assert result.exit_code == 0, result.output
    result = cli("merge", "runs/s0", "runs/s1", "--name", "both")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "both" / "summary.json").read_text())
    starts = summary["function"]["starts"]
    assert sorted(starts) == ["0", "1"] and starts["0"] != starts["1"]
    assert (tmp_path / "runs" / "both" / "trajectories.png").exists()
