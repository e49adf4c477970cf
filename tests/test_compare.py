import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

import optcli.engine.build as build_mod
import optcli.engine.loop as train_mod
from optcli.compare.aggregate import aggregate, verdict
from optcli.compare.comparison import Trial, parse_specs, run_comparison
from optcli.compare.options import CompareOptions
from optcli.config import load_config
from optcli.engine.loop import EpochMetrics, History
from tests.conftest import assert_user_error, cli, mnist_args

FAST = ["--set", "train.epochs=6", "--set", "data.samples=32", "--seeds", "1"]


def test_every_optimizer_of_a_seed_starts_from_the_same_weights_and_batches(monkeypatch):
    inits, perms = [], []
    real_build, real_batches = build_mod.build_optimizer, train_mod.batches

    def spy_build(model, *args, **kwargs):
        inits.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_build(model, *args, **kwargs)

    def spy_batches(split, batch_size, perm):
        perms.append(perm.clone())
        return real_batches(split, batch_size, perm)

    monkeypatch.setattr(build_mod, "build_optimizer", spy_build)
    monkeypatch.setattr(train_mod, "batches", spy_batches)
    cfg = load_config(None, ["train.epochs=3", "data.samples=40", "data.batch_size=8", "model.dropout=0.5"])
    run_comparison(cfg, ["sgd", "adam", "rmsprop"], CompareOptions(seeds=2))
    assert len(inits) == 6 and len(perms) == 18  # seed-major: 3 optimizers x 3 epochs per seed
    for seed in range(2):
        first = inits[3 * seed]
        for other in inits[3 * seed + 1 : 3 * seed + 3]:
            assert all(torch.equal(first[k], other[k]) for k in first)
        block = perms[9 * seed : 9 * seed + 9]
        for opt in range(1, 3):
            assert all(torch.equal(block[e], block[3 * opt + e]) for e in range(3))
    assert not torch.equal(inits[0]["fc1.weight"], inits[3]["fc1.weight"])  # seeds differ
    assert not torch.equal(perms[0], perms[9])


def test_same_dropout_masks_give_identical_runs_for_identical_specs():
    cfg = load_config(None, ["train.epochs=4", "data.samples=32", "model.dropout=0.5"])
    c = run_comparison(cfg, ["adam", "adam"], CompareOptions(seeds=1))
    assert [s.label for s in c.specs] == ["adam", "adam#2"]
    a, b = (t.history.epochs for t in c.trials)
    assert [e.train_loss for e in a] == [e.train_loss for e in b]


def _history(losses, val=None, status="completed"):
    epochs = [EpochMetrics(i + 1, x, None if val is None else val[i], None, 0.1, 0.5) for i, x in enumerate(losses)]
    return History(epochs, status)


def test_mean_and_std_over_seeds_hand_checked():
    specs = parse_specs(["sgd", "adam"])
    trials = [Trial("sgd", s, _history([9.0, v])) for s, v in zip(range(3), [1.0, 2.0, 3.0], strict=True)]
    trials += [Trial("adam", s, _history([9.0, v])) for s, v in zip(range(3), [4.0, 4.0, 4.0], strict=True)]
    rows = {r["label"]: r for r in aggregate(specs, trials)}
    assert rows["sgd"]["final_train_loss"] == pytest.approx(2.0)
    assert rows["sgd"]["final_train_loss_std"] == pytest.approx(1.0)  # sample std: sqrt(((1)^2+0+(1)^2)/2)
    assert rows["adam"]["final_train_loss_std"] == pytest.approx(0.0)
    assert rows["sgd"]["epochs_to_best"] == 2 and rows["sgd"]["seconds_per_epoch"] == 0.5


def _timed(seconds):
    return History([EpochMetrics(i + 1, 1.0, None, None, 0.1, t) for i, t in enumerate(seconds)], "completed")


def test_seconds_per_epoch_median_warm_leaves_out_the_cold_first_epoch():
    from optcli.rundir.run import summarize

    specs = parse_specs(["sgd", "adam"])
    # the first epoch pays for warm-up; after it one slow epoch (another process), which the median ignores
    trials = [Trial("sgd", 0, _timed([3.0, 1.0, 9.0, 1.5])), Trial("sgd", 1, _timed([5.0, 2.0, 2.0, 2.5]))]
    trials += [Trial("adam", 0, _timed([0.7]))]  # one epoch: its own time, cold or not
    rows = {r["label"]: r for r in aggregate(specs, trials)}
    assert rows["sgd"]["seconds_per_epoch_median_warm"] == pytest.approx((1.5 + 2.0) / 2)
    assert rows["sgd"]["seconds_per_epoch"] == pytest.approx((14.5 / 4 + 11.5 / 4) / 2)  # the mean, as before
    assert rows["adam"]["seconds_per_epoch_median_warm"] == pytest.approx(0.7)
    summary = summarize(load_config(None, []), trials[0].history, device=torch.device("cpu"), seconds=20.0)
    assert summary["seconds_per_epoch_median_warm"] == 1.5 and summary["seconds_per_epoch"] == 14.5 / 4


def test_the_s_per_epoch_column_shows_the_warm_median(tmp_path):
    result = cli("compare", "adam", *FAST, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    (row,) = summary["rows"]
    seconds = [e["seconds"] for e in summary["trials"][0]["epochs"]]
    assert len(seconds) > 2 and row["seconds_per_epoch_median_warm"] == pytest.approx(statistics.median(seconds[1:]))
    from optcli.report.format import fmt
    from optcli.report.tables import comparison_table

    table = comparison_table(SimpleNamespace(**summary))
    (column,) = [c for c in table.columns if c.header == "s/epoch"]
    assert list(column.cells) == [fmt(row["seconds_per_epoch_median_warm"], 3)]


def test_verdict_separates_a_real_lead_from_seed_noise():
    clear = [Trial("adam", s, _history([1.0 + 0.01 * s])) for s in range(4)]
    clear += [Trial("sgd", s, _history([2.0 + 0.02 * s])) for s in range(4)]
    v = verdict(clear, metric="final_train_loss", name="final train loss", lower_better=True, seeds=list(range(4)))
    assert v["best"] == "adam" and v["significant"] is True and v["p_value"] < 0.01
    assert v["ci"][0] > 0 and "larger than the seed-to-seed spread" in v["text"]
    from scipy import stats  # the reference implementation of the same test

    a, b = [2.0 + 0.02 * s for s in range(4)], [1.0 + 0.01 * s for s in range(4)]
    assert v["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert v["ci"] == pytest.approx(list(stats.ttest_rel(a, b).confidence_interval(0.95)))
    noisy = [Trial("adam", s, _history([x])) for s, x in enumerate([1.0, 3.0, 1.2, 2.9])]
    noisy += [Trial("sgd", s, _history([x])) for s, x in enumerate([2.0, 1.0, 2.1, 1.1])]
    v = verdict(noisy, metric="final_train_loss", name="final train loss", lower_better=True, seeds=list(range(4)))
    assert v["significant"] is False and "no clear winner" in v["text"]
    one = verdict(
        clear[:1] + clear[4:5], metric="final_train_loss", name="final train loss", lower_better=True, seeds=[0]
    )
    assert one["significant"] is None and "no claim" in one["text"]
    # equal means (steps to a target counted in whole epochs: 844/1266/1688 against 1266 on every seed)
    tied = [Trial("adam", s, _history([x])) for s, x in enumerate([844.0, 1266.0, 1688.0])]
    tied += [Trial("sgd", s, _history([1266.0])) for s in range(3)]
    v = verdict(tied, metric="final_train_loss", name="final train loss", lower_better=True, seeds=list(range(3)))
    assert v["lead"] == 0 and "tie on final train loss" in v["text"] and "leads" not in v["text"]


def test_divergent_spec_is_reported_while_others_complete(tmp_path):
    result = cli("compare", "sgd:lr=1e6", "adam", *FAST, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = {r["label"]: r for r in summary["rows"]}
    assert rows["sgd:lr=1e6"]["status"].startswith("diverged")
    assert rows["sgd:lr=1e6"]["diverged_at"][0]["epoch"] >= 1
    assert rows["adam"]["status"] == "completed"


def test_files_summary_matches_table_and_png_is_valid(tmp_path):
    result = cli("compare", "sgd:lr=1e-3,momentum=0.9", "adam", *FAST, "--seeds", "2")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("compare-")
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(run_dir / "loss.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    summary = json.loads((run_dir / "summary.json").read_text())
    from optcli.report.format import mean_pm

    text = " ".join(result.output.split())
    for row in summary["rows"]:
        assert mean_pm(row["final_train_loss"], row["final_train_loss_std"]) in text
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("optimizer,seed,epoch,train_loss") and len(lines) == 1 + 2 * 2 * 6
    assert "compare:" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("adamm", "optimizer spec 'adamm': unknown name 'adamm'"),
        ("sgd:momentun=0.9", "SGD takes no argument 'momentun'"),
        ("sgd:lr=[1,", "cannot parse the value of 'lr'"),
        ("sgd:lr", "expected key=value"),
        ("adam:lr=-1", "lr: must be > 0"),
        ("adam:betas=[2,0.9]", "Invalid beta parameter"),
    ],
)
def test_bad_specs_fail_before_any_training(spec, fragment, tmp_path):
    assert_user_error(cli("compare", "adam", spec), fragment, tmp_path)


def test_one_seed_verdict_says_no_claim(tmp_path):
    result = cli("compare", "sgd", "adam", *FAST)
    assert result.exit_code == 0, result.output
    assert "no claim can be made" in " ".join(result.output.split())


def test_tune_lr_gives_every_optimizer_the_same_budget(tiny_mnist):
    result = cli(
        "compare", "sgd", "adam", *mnist_args(tiny_mnist), "--epochs", "2", "--tune-lr", "--tune-budget", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    tuning = json.loads(result.stdout)["tuning"]
    assert tuning["budget"] == 3 and tuning["lr_only"] is True
    centres = {"sgd": 0.01, "adam": 0.01}  # mnist_args sets optimizer.lr=0.01: the default of every spec
    for label, t in tuning["optimizers"].items():
        (dim,) = t["space"]
        assert dim["name"] == "lr"
        assert dim["low"] == pytest.approx(centres[label] / 10) and dim["high"] == pytest.approx(centres[label] * 10)
        assert len(t["trials"]) == 3 and t["trials"][0]["params"]["lr"] == pytest.approx(centres[label])
        losses = [r["val_loss"] for r in t["trials"] if r["val_loss"] is not None]
        assert t["best"]["val_loss"] == min(losses)
    summary = json.loads(result.stdout)
    chosen = {r["label"]: r["hyperparameters"]["lr"] for r in summary["rows"]}
    assert chosen == {k: v["best"]["params"]["lr"] for k, v in tuning["optimizers"].items()}


def test_tune_lr_without_validation_split_is_an_error():
    result = cli("compare", "sgd", "adam", "--tune-lr", "--set", "data.val_fraction=0")
    assert result.exit_code == 2 and "val_fraction" in result.output


def test_classification_table_has_accuracies(tiny_mnist):
    result = cli("compare", "sgd:lr=0.1", "adam", *mnist_args(tiny_mnist), "--epochs", "3", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert all(0 <= r["test_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in rows)
    assert all(not math.isnan(r["best_val_loss"]) for r in rows)


@pytest.mark.slow
def test_parallel_jobs_give_the_serial_results_bit_for_bit(tiny_mnist):
    args = [
        "sgd:lr=0.05",
        "adam",
        *mnist_args(tiny_mnist, "--set", "model.hidden=[600,300]"),
        "--epochs",
        "2",
        "--seeds",
        "2",
        "--json",
        "--threads",
        "1",
    ]
    serial = json.loads(cli("compare", *args).stdout)
    result = cli("compare", *args, "--jobs", "2")
    assert result.exit_code == 0, result.output
    parallel = json.loads(result.stdout)
    timings = {"seconds", "train_seconds"}
    strip = lambda s: [[{k: v for k, v in e.items() if k not in timings} for e in t["epochs"]] for t in s["trials"]]  # noqa: E731
    assert strip(serial) == strip(parallel)
    assert parallel["jobs"] == 2


def test_comparisons_run_apart_merge_into_the_one_run_together(tmp_path):
    common = ["sgd:lr=0.01", "adam", *FAST, "--json"]
    whole = json.loads(cli("compare", *common, "--seeds", "3", "--set", "name=whole").stdout)
    assert cli("compare", *common, "--seeds", "2", "--set", "seed=0", "--set", "name=a").exit_code == 0
    assert cli("compare", *common, "--seeds", "1", "--set", "seed=2", "--set", "name=b").exit_code == 0
    result = cli("merge", tmp_path / "runs" / "a", tmp_path / "runs" / "b", "--name", "ab", "--json")
    assert result.exit_code == 0, result.output
    merged = json.loads(result.stdout)
    assert merged["seeds"] == [0, 1, 2]
    key = lambda t: (t["label"], t["seed"])  # noqa: E731
    losses = lambda s: {key(t): [e["train_loss"] for e in t["epochs"]] for t in s["trials"]}  # noqa: E731
    assert losses(merged) == losses(whole)
    for a, b in zip(merged["rows"], whole["rows"], strict=True):
        assert a["final_train_loss"] == b["final_train_loss"] and a["final_train_loss_std"] == b["final_train_loss_std"]
    assert [v["text"] for v in merged["verdicts"]] == [v["text"] for v in whole["verdicts"]]
    assert (tmp_path / "runs" / "ab" / "loss.png").exists()


def test_merge_refuses_unlike_or_overlapping_comparisons(tmp_path):
    assert cli("compare", "sgd", "adam", *FAST, "--set", "name=a").exit_code == 0
    assert cli("compare", "sgd", "rmsprop", *FAST, "--set", "name=b").exit_code == 0
    result = cli("merge", tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    assert result.exit_code == 2 and "differs from" in result.output and "in specs" in result.output
    result = cli("merge", tmp_path / "runs" / "a", tmp_path / "runs" / "a")
    assert result.exit_code == 2 and "sgd seed 0 is in both" in result.output
    result = cli("merge", tmp_path / "runs" / "a", tmp_path)
    assert result.exit_code == 2 and "not a comparison run directory" in result.output
