"""compare's newer paths (tuning, several tasks) refuse what cannot run before anything is made: one line naming the
flag, the file or the key, exit 2, and no run directory."""

import json

import pytest

from tests.conftest import assert_user_error, cli

TUNE = ["adam", "--tune-lr", "--tune-budget", "2", "--seeds", "1", "--epochs", "1"]


@pytest.mark.parametrize(
    "storage, fragment",
    [
        ("nofolder/s.journal", "--tune-storage nofolder/s.journal: expected a journal file in an existing folder"),
        ("sqlite:///nofolder/s.db", "--tune-storage sqlite:///nofolder/s.db: the folder nofolder does not exist"),
        ("foo://bar", "--tune-storage foo://bar: unknown database scheme 'foo'"),
        ("sqlite://x/y", "--tune-storage sqlite://x/y: cannot open the database (Invalid SQLite URL"),
    ],
)
def test_a_tuning_storage_that_cannot_open_is_refused_before_the_run_directory(storage, fragment, tmp_path):
    pytest.importorskip("optuna")
    result = cli("compare", *TUNE, "--tune-storage", storage)
    assert_user_error(result, f"error: {fragment}", tmp_path)
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("bounds", ["[1.0e-3, 1.0e400]", "[.nan, 1.0]"])
def test_tuning_space_bounds_must_be_finite_and_are_named_by_key_path(bounds, tmp_path):
    pytest.importorskip("optuna")
    result = cli("compare", *TUNE, "--set", f"tuning.spaces={{adam: {{lr: {bounds}}}}}")
    assert_user_error(result, "error: tuning.spaces.adam.lr: ", tmp_path)


def test_every_task_of_a_multi_task_comparison_is_checked_first_naming_its_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 1}\ndata: {samples: 32}\n")
    (tmp_path / "b.yaml").write_text("optimizer: {centered: true}\ntrain: {epochs: 1}\n")
    result = cli("compare", "sgd", "adam", "-c", "a.yaml", "-c", "b.yaml", "--seeds", "1")
    assert_user_error(
        result, "error: b.yaml: optimizer.centered: no optimizer of this comparison takes it (SGD, Adam)", tmp_path
    )


@pytest.mark.parametrize(
    "flags, fragment", [(["--seeds", "0"], "--seeds: must be at least 1"), (["--backend", "nope"], "--backend")]
)
def test_bad_options_with_two_configs_leave_nothing(flags, fragment, tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 1}\n")
    assert_user_error(cli("compare", "sgd", "-c", "a.yaml", "-c", "a.yaml", *flags), fragment, tmp_path)


FUNCTION = ["--set", "data.name=function", "--seeds", "1", "--epochs", "2"]
NO_VAL_LOSS = "data.name=function (function) has no val_loss (its metrics: train_loss)"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--target", "val_loss=100"], f"error: --target val_loss=100: {NO_VAL_LOSS}"),
        (["--set", "train.early_stopping={metric: val_loss}"], f"train.early_stopping.metric: {NO_VAL_LOSS}"),
        (["--tune-lr"], f"error: --tune-lr: judges trials on val_loss; {NO_VAL_LOSS}"),
    ],
)
def test_a_2d_function_has_no_val_loss_for_a_target_early_stopping_or_tuning(extra, fragment, tmp_path):
    if "--tune-lr" in extra:
        pytest.importorskip("optuna")
    result = cli("compare", "sgd", "adam", *FUNCTION, *extra)
    assert_user_error(result, fragment, tmp_path)
    assert "try val_loss" not in result.output


def test_a_2d_function_keeps_its_train_loss_target(tmp_path):
    result = cli("compare", "sgd", *FUNCTION, "--target", "train_loss=100", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["target"] == {"metric": "train_loss", "value": 100.0, "higher_is_better": False}
    # the function starts below 100 (about 6.8 after one step), so the target is reached at the first epoch
    row = summary["rows"][0]
    assert (row["target_reached"], row["target_epoch"], row["target_steps"]) == (1, 1.0, 1.0)


MISSING_MNIST = ["--set", "data.name=mnist", "--set", "data.root=nowhere", "--set", "data.download=false"]
MISSING_LINE = "error: data: MNIST not found in nowhere/MNIST/raw (missing train-images-idx3-ubyte"


@pytest.mark.parametrize("extra", [[], ["--jobs", "2"], ["--jobs", "2", "--tune-lr"]])
def test_data_that_is_not_there_is_the_same_line_serially_and_in_workers(extra, tmp_path):
    if "--tune-lr" in extra:
        pytest.importorskip("optuna")
    result = cli("compare", "sgd", "adam", *MISSING_MNIST, "--seeds", "1", "--epochs", "1", *extra)
    assert_user_error(result, MISSING_LINE, tmp_path)  # no BrokenProcessPool, no run directory (tuning included)
    assert [line for line in result.output.splitlines() if line.startswith("error")] == [
        line for line in result.output.splitlines() if MISSING_LINE in line
    ]


def test_an_unreachable_ray_cluster_is_one_line_at_once(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # the discard port: nothing answers
    result = cli("compare", "sgd", "--seeds", "1", "--epochs", "1", "--backend", "ray")
    assert_user_error(result, "error: RAY_ADDRESS=127.0.0.1:9: no Ray cluster answers there", tmp_path)


def test_a_comparison_is_bounded_in_trials_so_its_summary_stays_readable(tmp_path):
    result = cli("compare", "sgd", "adam", "--seeds", "1000000")
    assert_user_error(
        result, "error: --seeds: 2 optimizer(s) x (1000000 seeds) = 2000000 trials, over the limit of 10000", tmp_path
    )
