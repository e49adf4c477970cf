"""train.early_stopping: Keras' rule, decided from the history alone, in train, resume and compare."""

import json

import pytest

from optcli.config import EarlyStoppingConfig
from optcli.engine.loop import EpochMetrics, History, early_stop
from tests.conftest import cli, mnist_args

# no improvement is possible after the first epoch: the run stops after exactly `patience` more
NEVER_BETTER = "train.early_stopping={metric: train_loss, patience: 2, min_delta: 1.0e9}"


def _history(values, metric="val_loss"):
    rows = [EpochMetrics(i + 1, 1.0, None, None, 0.1, 0.0) for i in range(len(values))]
    for row, v in zip(rows, values, strict=True):
        setattr(row, metric, v)
    return History(rows)


@pytest.mark.parametrize(
    "values, rule, stops_at, best_epoch",
    [
        ([5.0, 4.0, 4.5, 4.2], {"patience": 2}, 4, 2),  # two epochs without beating 4.0
        ([5.0, 4.0, 4.5, 3.9], {"patience": 2}, None, None),  # 3.9 beats 4.0 in time
        ([5.0, 4.0, 3.95, 3.92], {"patience": 2, "min_delta": 0.1}, 4, 2),  # improvements smaller than min_delta
        ([5.0, float("nan"), float("nan")], {"patience": 2}, 3, 1),  # a NaN is no improvement
        ([0.5, 0.6, 0.65], {"metric": "val_accuracy", "patience": 1}, None, None),  # accuracy: higher is better
        ([0.5, 0.6, 0.55], {"metric": "val_accuracy", "patience": 1}, 3, 2),
        ([0.5, 0.6, 0.55], {"metric": "val_accuracy", "patience": 1, "mode": "min"}, 2, 1),
    ],
)
def test_rule_matches_keras(values, rule, stops_at, best_epoch):
    cfg = EarlyStoppingConfig(**rule)
    # the training loop asks after every epoch: the first epoch at which the rule says stop
    stop = next(
        (s for n in range(1, len(values) + 1) if (s := early_stop(_history(values[:n], cfg.metric), cfg))), None
    )
    if stops_at is None:
        assert stop is None
    else:
        assert stop is not None and stop["epoch"] == stops_at and stop["best_epoch"] == best_epoch


def test_train_stops_early_with_status_and_epoch_in_summary(tiny_mnist, tmp_path):
    result = cli("train", *mnist_args(tiny_mnist, "--set", "train.epochs=10", "--set", NEVER_BETTER), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "stopped_early" and out["epochs_completed"] == 3 and out["epochs_planned"] == 10
    stop = out["stopped_early"]
    assert (stop["epoch"], stop["best_epoch"], stop["metric"]) == (3, 1, "train_loss")
    assert out["test_accuracy"] is not None  # the test split is still evaluated after an early stop
    on_disk = json.loads((tmp_path / "runs" / out["run_dir"].split("/")[-1] / "summary.json").read_text())
    assert on_disk["status"] == "stopped_early" and on_disk["stopped_early"]["epoch"] == 3


def test_a_resumed_run_stops_where_the_uninterrupted_one_did(tiny_mnist, tmp_path):
    args = mnist_args(tiny_mnist, "--set", NEVER_BETTER)
    assert cli("train", *args, "--set", "train.epochs=10", "--set", "name=whole").exit_code == 0
    assert cli("train", *args, "--set", "train.epochs=2", "--set", "name=part").exit_code == 0
    result = cli("train", "--resume", tmp_path / "runs" / "part", "--set", "train.epochs=10", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs_completed"] == 3
    whole = json.loads((tmp_path / "runs" / "whole" / "summary.json").read_text())
    assert whole["epochs_completed"] == 3


def test_validation_metric_without_a_validation_split_is_refused(tmp_path):
    result = cli("train", "--set", "train.early_stopping={metric: val_loss}", "--set", "data.val_fraction=0")
    assert result.exit_code == 2 and "needs a validation split" in result.output


def test_compare_handles_trials_that_stop_at_different_epochs(tiny_mnist):
    # patience 2 with an impossible min_delta stops sgd and adam at epoch 3; the plain spec of a second comparison
    # without the rule runs all epochs: each aggregate must count finished trials and curves must end early
    result = cli(
        "compare",
        "sgd:lr=0.05",
        "adam",
        *mnist_args(tiny_mnist, "--set", NEVER_BETTER),
        "--epochs",
        "6",
        "--seeds",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for row in out["rows"]:
        assert row["completed"] == 2 and row["status"] == "stopped early 2/2"
        assert row["best_val_loss"] is not None
    curve = out["curves"]["adam"]["train_loss"]
    assert len(curve) == 3 and curve[2][0] is not None  # epochs 4-6 were never trained: the curves end at 3
    assert all(v["best"] for v in out["verdicts"])
