"""Issue 11: the default task has signal, every compare setting is applied or refused, schedulers step at their
interval, closure optimizers with grad_clip/accumulate, MNIST scaling, time to target, provenance."""

import json
import math

import pytest
import torch

from optcli.compare.comparison import run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.stats import Target, parse_target, steps_to_target, time_to_target
from optcli.config import load_config
from optcli.engine.build import build_model_and_optimizer
from optcli.engine.loop import EpochMetrics, History, Training, fit
from optcli.tasks import load_data
from optcli.tasks.mnist import load_mnist
from tests.conftest import assert_user_error, cli, mnist_args

SMALL = ["train.epochs=3", "data.samples=200"]


def test_teacher_targets_carry_signal_and_noise_of_the_stated_std():
    cfg = load_config(None, ["data.samples=4000", "data.noise=0.5", "data.val_fraction=0"])
    y = load_data(cfg.data, torch.device("cpu")).train.y
    # signal scaled to unit variance plus independent noise of variance 0.25: total variance 1.25; with 4000
    # samples the sample variance has a relative standard error of sqrt(2/4000) ~ 2.2%, so 10% is far outside it
    assert y.var().item() == pytest.approx(1.25, rel=0.1)
    noiseless = load_config(None, ["data.samples=4000", "data.noise=0", "data.val_fraction=0"])
    clean = load_data(noiseless.data, torch.device("cpu")).train.y
    assert (y - clean).std().item() == pytest.approx(0.5, rel=0.1)  # the same teacher, only the noise differs


def test_default_comparison_reports_the_excess_over_the_noise_floor():
    c = run_comparison(load_config(None, SMALL), ["sgd", "adam"], CompareOptions(seeds=1))
    assert c.loss_floor == pytest.approx(0.25)
    for row in c.rows:
        assert row["excess_val_loss"] == pytest.approx(row["best_val_loss"] - 0.25)


def test_set_optimizer_keys_are_defaults_for_every_spec_that_takes_them(tmp_path):
    result = cli(
        "compare", "sgd", "adam:lr=0.01", "--set", "optimizer.lr=0.05", "--set", "optimizer.momentum=0.9",
        "--seeds", "1", "--epochs", "2", "--set", "name=c", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "c"
    ran = {s["label"]: s["kwargs"] for s in json.loads((run / "summary.json").read_text())["specs"]}
    assert ran == {"sgd": {"lr": 0.05, "momentum": 0.9}, "adam:lr=0.01": {"lr": 0.01}}  # Adam has no momentum
    written = (run / "config.yaml").read_text()
    assert "optimizer:" not in written.split("compare:")[0]  # no section that could be read as what ran
    trials = {t["label"]: t for t in json.loads((run / "summary.json").read_text())["trials"]}
    assert trials["sgd"]["epochs"][0]["lr"] == 0.05 and trials["adam:lr=0.01"]["epochs"][0]["lr"] == 0.01


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["optimizer.name=sgd"], "optimizer.name applies to train only"),
        (["optimizer.nesterov=true"], "optimizer.nesterov: no optimizer of this comparison takes it"),
        (["optimizer.lr=abc"], "optimizer.lr: Adam expects a number"),
    ],
)
def test_compare_settings_no_spec_can_take_are_refused(sets, fragment, tmp_path):
    args = [x for s in sets for x in ("--set", s)]
    assert_user_error(cli("compare", "adam", "rmsprop", *args), fragment, tmp_path)


def test_threads_zero_is_refused(tmp_path):
    assert_user_error(cli("compare", "adam", "--threads", "0"), "--threads: must be at least 1", tmp_path)


def test_train_names_the_key_and_type_of_a_bad_value(tmp_path):
    assert_user_error(cli("train", "--set", "optimizer.lr=abc"), "optimizer.lr: Adam expects a number", tmp_path)
    assert_user_error(cli("train", "--set", "optimizer.amsgrad=3"), "expects true or false", tmp_path)


def test_summary_records_provenance(tmp_path):
    assert cli("train", "--epochs", "1", "--set", "name=t").exit_code == 0
    p = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())["provenance"]
    assert p["torch"] == torch.__version__ and p["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert p["threads"] >= 1 and p["device"] == "cpu" and "optcli" in p


def test_merge_warns_when_provenance_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        assert cli("compare", "sgd", "adam", "--seeds", "1", "--epochs", "2", "--set", f"seed={seed}",
                   "--set", f"name={name}").exit_code == 0  # fmt: skip
    path = tmp_path / "runs" / "b" / "summary.json"
    summary = json.loads(path.read_text())
    summary["provenance"]["torch"] = "0.0.1"
    path.write_text(json.dumps(summary))
    result = cli("merge", tmp_path / "runs" / "a", tmp_path / "runs" / "b", "--name", "m")
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "0.0.1" in " ".join(result.output.split())


def _lrs_by_step(sets: list[str]) -> tuple[list[float], object]:
    cfg = load_config(None, sets)
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    lrs: list[float] = []
    fit(
        Training(cfg, model, optimizer, scheduler, data),
        on_batch=lambda e, i, n: lrs.append(optimizer.param_groups[0]["lr"]),
    )
    return lrs, cfg


def test_onecycle_steps_per_optimizer_step_like_torch_stepped_by_hand():
    # 800 training samples, batch 64: 13 batches; accumulate 2: 7 optimizer steps per epoch, 14 in 2 epochs
    lrs, _ = _lrs_by_step(["train.epochs=2", "train.accumulate=2", "scheduler={name: onecyclelr, max_lr: 0.01}"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=14)
    expected, step = [], 0
    for _epoch in range(2):
        for batch in range(13):
            if (batch + 1) % 2 == 0 or batch == 12:
                opt.step()
                sched.step()
                step += 1
            expected.append(opt.param_groups[0]["lr"])
    assert step == 14 and lrs == expected  # the same float arithmetic in the same order: exactly equal


def test_cosine_t_max_counts_epochs_at_epoch_interval_and_steps_at_step_interval():
    lrs, _ = _lrs_by_step(["train.epochs=2", "scheduler={name: cosineannealinglr, interval: step}"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # T_max = 26 steps: the schedule ends at the last step
    by_epoch, _ = _lrs_by_step(["train.epochs=2", "scheduler={name: cosineannealinglr}"])
    assert len(set(by_epoch[:13])) == 1 and by_epoch[13] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 2)) / 2)


def test_lbfgs_applies_grad_clip_and_refuses_accumulate(tmp_path):
    base = ["--set", "optimizer.name=lbfgs", "--set", "optimizer.lr=1", "--epochs", "1"]
    plain = cli("train", *base, "--set", "name=plain", "--json")
    clipped = cli("train", *base, "--set", "train.grad_clip=1e-9", "--set", "name=clip", "--json")
    assert plain.exit_code == 0 and clipped.exit_code == 0, clipped.output
    final = lambda r: json.loads(r.stdout)["final"]["train_loss"]  # noqa: E731
    assert final(plain) != final(clipped)
    refused = cli("train", "--set", "optimizer.name=lbfgs", "--set", "train.accumulate=2")
    assert refused.exit_code == 2 and "train.accumulate: LBFGS" in refused.output


@pytest.mark.parametrize("normalize", ["standardize", "unit", "none"])
def test_mnist_normalize(normalize, tiny_mnist):
    cfg = load_config(None, ["data.name=mnist", f"data.root={tiny_mnist}", "data.download=false",
                             "train.loss=cross_entropy", f"data.normalize={normalize}"])  # fmt: skip
    x = load_mnist(cfg.data)[0].x
    raw_max = 255.0  # make_digits lights a block at 255
    expected = {"none": raw_max, "unit": 1.0, "standardize": (1.0 - 0.1307) / 0.3081}[normalize]
    assert x.max().item() == pytest.approx(expected, rel=1e-6)  # one float32 division or two: a few ulp


def _history(values: list[float]) -> History:
    return History(
        [EpochMetrics(i + 1, 1.0, 1.0, v, 0.1, 1.0, steps=10 * (i + 1), train_seconds=0.5 * (i + 1))
         for i, v in enumerate(values)]
    )  # fmt: skip


def test_time_to_target_is_the_first_epoch_meeting_it():
    target = parse_target("val_accuracy=0.9", ["val_loss", "val_accuracy"])
    assert target == Target("val_accuracy", 0.9, True)
    h = _history([0.5, 0.91, 0.85, 0.95])
    assert time_to_target(h, target) == {"epoch": 2, "steps": 20, "seconds": 1.0}
    assert steps_to_target(_history([0.5, 0.6]), target) is None
    assert parse_target("val_loss=0.1", ["val_loss"]).higher_is_better is False


def test_compare_target_on_mnist_in_table_json_and_csv(tiny_mnist, tmp_path):
    args = mnist_args(tiny_mnist, "--epochs", "3", "--seeds", "2", "--set", "name=t")
    result = cli("compare", "sgd:lr=0.1", "adam", *args, "--target", "val_accuracy=0.5", "--json")
    assert result.exit_code == 0, result.output
    c = json.loads(result.stdout)
    assert c["target"] == {"metric": "val_accuracy", "value": 0.5, "higher_is_better": True}
    for row in c["rows"]:
        mine = [t for t in c["trials"] if t["label"] == row["label"]]
        firsts = [next((e for e in t["epochs"] if e["val_accuracy"] >= 0.5), None) for t in mine]
        assert row["target_reached"] == sum(f is not None for f in firsts)
        if row["target_reached"]:
            assert row["target_steps"] == pytest.approx(sum(f["steps"] for f in firsts if f) / row["target_reached"])
    assert c["verdicts"][0]["metric"] == "target_steps"
    csv = (tmp_path / "runs" / "t" / "metrics.csv").read_text().splitlines()
    assert "target_met" in csv[0] and "steps" in csv[0] and "train_seconds" in csv[0]


def test_target_needing_what_the_task_lacks_is_refused(tmp_path):
    assert_user_error(cli("compare", "sgd", "--target", "val_accuracy=0.9"), "classification", tmp_path)
    assert_user_error(cli("compare", "sgd", "--target", "lr=0.1"), "unknown metric", tmp_path)
