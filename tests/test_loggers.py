import json
import sys

import pytest

from tests.conftest import assert_user_error, cli


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


TB = [
    *("--set", "train.loggers=[csv,tensorboard]", "--set", "data.samples=64"),
    *("--set", "data.val_fraction=0.25", "--set", "data.batch_size=16"),
]


def test_train_writes_event_files_that_match_the_metrics(tmp_path):
    result = cli("train", *TB, "--set", "train.epochs=6", "--set", "train.log_steps=true", "--set", "name=tb")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tb"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    log_dir = run_dir / "tensorboard"
    # event files hold float32: a float64 metric read back differs by at most half an ulp, 2**-24 relative
    for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("lr", "lr")):
        got = scalars(log_dir, tag)
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        for r in rows:
            assert got[r["epoch"]] == pytest.approx(r[key], rel=2**-23)
    grad = scalars(log_dir, "grad_norm/fc1")
    assert grad[6] == pytest.approx(rows[-1]["dynamics"]["layers"]["fc1"]["grad_norm"], rel=2**-23)
    steps = scalars(log_dir, "loss/train_step")
    assert sorted(steps) == list(range(1, 6 * 3 + 1))  # 48 training samples in batches of 16: 3 steps an epoch
    # the epoch's loss is the mean of its per-sample step losses (equal batches here)
    assert sum(steps[s] for s in (16, 17, 18)) / 3 == pytest.approx(rows[-1]["train_loss"], rel=1e-5)


def test_compare_writes_one_directory_per_trial(tmp_path):
    result = cli("compare", "sgd", "adam:lr=1e-3", *TB, "--epochs", "3", "--seeds", "2", "--set", "name=c")
    assert result.exit_code == 0, result.output
    root = tmp_path / "runs" / "c" / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == [
        "adam_lr=1e-3-seed0",
        "adam_lr=1e-3-seed1",
        "sgd-seed0",
        "sgd-seed1",
    ]
    summary = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    for trial in summary["trials"]:
        name = f"{trial['label'].replace(':', '_')}-seed{trial['seed']}"
        got = scalars(root / name, "loss/val")
        assert [got[e["epoch"]] for e in trial["epochs"]] == pytest.approx(
            [e["val_loss"] for e in trial["epochs"]], rel=2**-23
        )


def test_csv_logger_can_be_left_out(tmp_path):
    result = cli("train", "--set", "train.loggers=[tensorboard]", "--epochs", "2", "--set", "name=r")
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "runs" / "r").iterdir()}
    assert "tensorboard" in names and "metrics.csv" not in names and "summary.json" in names


def test_missing_tensorboard_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for command in (["train"], ["compare", "sgd"]):
        result = cli(*command, "--set", "train.loggers=[tensorboard]", "--epochs", "1")
        assert_user_error(result, "needs optcli[tensorboard]: pip install 'optcli[tensorboard]'", tmp_path)


def test_unknown_logger_is_refused(tmp_path):
    assert_user_error(cli("train", "--set", "train.loggers=[wandb]"), "train.loggers.0", tmp_path)
