"""compare --tune: search spaces, equal budgets of quasi-random trials, shared study storage."""

import json
import math

import pytest

from optcli.compare.comparison import parse_specs, run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.runners import TrialCallbacks
from optcli.compare.tuning import Dimension, kwargs_at, search_space
from optcli.config import load_config
from optcli.errors import UserError
from tests.conftest import assert_user_error, cli, mnist_args

pytest.importorskip("optuna")


def _space(text: str, **kw) -> dict[str, tuple[float, float]]:
    (spec,) = parse_specs([text])
    return {d.name: (d.low, d.high) for d in search_space(spec, **kw)}


def test_default_spaces_are_read_from_each_signature():
    adam = _space("adam")
    assert list(adam) == ["lr", "one_minus_beta1", "one_minus_beta2", "eps", "weight_decay"]
    assert adam["lr"] == pytest.approx((1e-4, 1e-2))  # two decades around Adam's default 1e-3
    assert adam["one_minus_beta1"] == pytest.approx((0.01, 1.0))  # 1 - 0.9 = 0.1, capped at 1
    assert adam["one_minus_beta2"] == pytest.approx((1e-4, 1e-2))
    assert adam["eps"] == pytest.approx((1e-9, 1e-7))
    assert adam["weight_decay"] == pytest.approx((1e-5, 1e-3))  # default 0: a fixed log range
    sgd = _space("sgd:lr=0.1")
    assert list(sgd) == ["lr", "one_minus_momentum", "weight_decay"]
    assert sgd["lr"] == pytest.approx((0.01, 1.0)) and sgd["one_minus_momentum"] == pytest.approx((0.1, 1.0))
    assert "one_minus_beta1" not in _space("adam:betas=[0.8,0.99]")  # set in the spec: fixed
    assert list(_space("lion")) == ["lr", "one_minus_beta1", "one_minus_beta2", "weight_decay"]
    assert list(_space("adam", lr_only=True)) == ["lr"]
    assert _space("adam", lr_centre=3e-3)["lr"] == pytest.approx((3e-4, 3e-2))  # e.g. an lr-finder's suggestion


def test_space_overrides_from_the_config_and_their_errors():
    overrides = {"adam": {"eps": None, "lr": [1e-5, 1e-1], "amsgrad": None}}
    with pytest.raises(UserError, match="not a hyperparameter of adam"):
        _space("adam", overrides=overrides)
    space = _space("adam", overrides={"adam": {"eps": None, "lr": [1e-5, 1e-1]}})
    assert "eps" not in space and space["lr"] == (1e-5, 1e-1)
    with pytest.raises(UserError, match="did you mean 'weight_decay'"):
        _space("adam", overrides={"adam": {"weight_decai": [1e-4, 1e-2]}})
    with pytest.raises(UserError, match="low must be below high"):
        _space("adam", overrides={"adam": {"lr": [1e-2, 1e-4]}})
    cfg = load_config(None, ["data.val_fraction=0.25", "tuning.spaces={adamm: {lr: [1e-4, 1e-2]}}"])
    with pytest.raises(UserError, match="tuning.spaces.adamm: matches no optimizer"):
        run_comparison(cfg, ["adam"], CompareOptions(tune=True))


def test_points_map_back_to_the_optimizer_keywords():
    (spec,) = parse_specs(["adam"])
    kwargs = kwargs_at(spec, {"lr": 0.002, "one_minus_beta1": 0.2, "one_minus_beta2": 0.01, "weight_decay": 1e-4})
    assert kwargs["lr"] == 0.002 and kwargs["weight_decay"] == 1e-4
    assert kwargs["betas"] == pytest.approx((0.8, 0.99))
    d = Dimension("lr", 1e-4, 1e-2)
    assert d.centre() == pytest.approx(1e-3) and d.position(1e-3) == pytest.approx(0.5)


def test_tune_gives_every_optimizer_the_same_budget_and_runs_the_winner(tiny_mnist, tmp_path):
    result = cli(
        "compare", "sgd:lr=0.1", "adam", *mnist_args(tiny_mnist), "--epochs", "2", "--tune", "--tune-budget", 3
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Search spaces" in text and "Tuned settings" in text
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    tuning = summary["tuning"]
    for label, t in tuning["optimizers"].items():
        space = [Dimension(**d) for d in t["space"]]
        assert len(t["trials"]) == 3  # the same budget for every optimizer
        assert t["trials"][0]["params"] == pytest.approx({d.name: d.centre() for d in space})
        points = {tuple(sorted(r["params"].items())) for r in t["trials"]}
        assert len(points) == 3  # quasi-random points, all distinct
        for r in t["trials"]:
            assert all(d.low <= r["params"][d.name] <= d.high for d in space)
        done = [r for r in t["trials"] if r["val_loss"] is not None]
        assert t["best"]["val_loss"] == min(r["val_loss"] for r in done)
        edge = [d.name for d in space if not 0.1 <= d.position(t["best"]["params"][d.name]) <= 0.9]
        assert [e["name"] for e in t["at_edge"]] == edge
        row = next(r for r in summary["rows"] if r["label"] == label)
        assert _flat(row["hyperparameters"]) == pytest.approx(_flat(t["best"]["kwargs"]))
    assert len((run_dir / "tuning.csv").read_text().splitlines()) == 1 + 2 * 3
    assert (run_dir / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "tuning.journal").is_file()  # the study storage, embedded in the run directory
    assert math.isfinite(summary["rows"][0]["best_val_loss"])


def test_a_shared_storage_lets_a_second_machine_reuse_the_studies(tiny_mnist, tmp_path):
    storage = tmp_path / "studies.journal"
    cfg = load_config(None, [a for a in mnist_args(tiny_mnist) if a != "--set"] + ["train.epochs=1"])
    counts = []

    def run():
        done = []
        callbacks = TrialCallbacks(on_trial_done=lambda label, seed, h: done.append(label))
        c = run_comparison(
            cfg,
            ["sgd", "adam"],
            CompareOptions(seeds=1, tune=True, tune_budget=2, tune_storage=str(storage)),
            callbacks=callbacks,
        )
        counts.append(len(done))
        return c.tuning

    first, second = run(), run()
    assert counts == [2 * 2 + 2, 2]  # the second machine finds the budget spent and only runs the seeds
    for label in ("sgd", "adam"):
        assert first["optimizers"][label]["trials"] == second["optimizers"][label]["trials"]
        assert first["optimizers"][label]["study"] == second["optimizers"][label]["study"]


def test_tuning_needs_a_validation_split_and_a_storage_needs_tuning(tmp_path):
    no_val = ["--set", "data.val_fraction=0"]
    assert_user_error(cli("compare", "adam", "--tune", *no_val), "--tune: needs a validation split", tmp_path)
    assert_user_error(
        cli("compare", "adam", "--tune-storage", "x.journal"), "--tune-storage: only with --tune", tmp_path
    )
    result = cli("compare", "adam", "--tune", "--set", "data.val_fraction=0.25", "--tune-storage", "nodir/x.journal")
    assert result.exit_code == 2 and "expected a journal file in an existing folder" in result.output


def test_tune_centre_lr_find_centres_each_lr_range_on_the_range_test_and_counts_its_steps(tmp_path):
    assert_user_error(cli("compare", "adam", "--tune-centre", "lr-find"), "only with --tune", tmp_path)
    assert_user_error(cli("compare", "adam", "--tune-lr", "--tune-centre", "middle"), "--tune-centre", tmp_path)
    small = ["--set", "train.epochs=2", "--set", "data.samples=200", "--seeds", "1"]
    result = cli(
        "compare", "sgd", "adam", "--tune-lr", "--tune-budget", "2", "--tune-centre", "lr-find", *small, "--json"
    )
    assert result.exit_code == 0, result.output
    tuning = json.loads(result.stdout)["tuning"]
    assert tuning["lr_centre"] == "lr-find"
    for label, name in (("sgd", "sgd"), ("adam", "adam")):
        t = tuning["optimizers"][label]
        # the same suggestion as the standalone range test on the same task and seed
        alone = cli("lr-find", "--optimizer", name, "--set", "data.samples=200", "--json")
        assert alone.exit_code == 0, alone.output
        suggestion = json.loads(alone.stdout)["suggestion"]
        assert t["lr_find"]["suggestion"] == pytest.approx(suggestion, rel=1e-12)
        (lr,) = [d for d in t["space"] if d["name"] == "lr"]
        assert math.sqrt(lr["low"] * lr["high"]) == pytest.approx(suggestion)  # the log-centre of the range
        steps_per_trial = 2 * math.ceil(160 / 64)  # 2 epochs of 160 training samples in batches of 64
        assert t["cost_steps"] == 2 * steps_per_trial + t["lr_find"]["steps"] == 2 * steps_per_trial + 100


def _flat(kwargs: dict) -> dict:
    """{"betas": [a, b]} as {"betas.0": a, "betas.1": b}: pytest.approx compares flat mappings only."""
    flat = {}
    for key, value in kwargs.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}.{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat
