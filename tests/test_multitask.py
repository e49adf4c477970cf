"""compare over several tasks: each task's comparison, and a performance profile across them."""

import io
import json
import math
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console

from optcli.compare.performance_profile import profile, ratios
from optcli.report.profile import measures_table, profile_table
from tests.conftest import assert_user_error, cli


def test_profile_hand_checked():
    measures = {"t1": {"a": 1.0, "b": 2.0, "c": math.inf}, "t2": {"a": 3.0, "b": 1.5, "c": 1.5}}
    assert ratios(measures) == {"t1": {"a": 1.0, "b": 2.0, "c": math.inf}, "t2": {"a": 2.0, "b": 1.0, "c": 1.0}}
    # a: best on t1, x2 on t2; b: x2 on t1, best on t2; c: failed t1 (never within any tau), best on t2
    assert profile(measures, [1.0, 1.9, 2.0, 100.0]) == {
        "a": [0.5, 0.5, 1.0, 1.0],
        "b": [0.5, 0.5, 1.0, 1.0],
        "c": [0.5, 0.5, 0.5, 0.5],
    }


def _configs(tmp_path, tiny_mnist):
    regression = {"data": {"val_fraction": 0.25, "samples": 64}, "train": {"epochs": 4}}
    mnist = {
        "data": {"name": "mnist", "root": str(tiny_mnist), "download": False, "batch_size": 32, "val_fraction": 0.2},
        "model": {"hidden": [32]},
        "train": {"epochs": 2, "loss": "cross_entropy", "reduction": "mean"},
    }
    paths = []
    for name, cfg in (("reg", regression), ("digits", mnist)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(path)
    return paths


def test_two_tasks_give_each_table_and_a_profile(tmp_path, tiny_mnist):
    reg, digits = _configs(tmp_path, tiny_mnist)
    result = cli("compare", "sgd:lr=1e-4", "adam:lr=1e-3", "-c", reg, "-c", digits, "--seeds", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [t["name"] for t in out["tasks"]] == ["reg", "digits"]
    assert out["measure"] == "best_val_loss" and "scale-free" in out["measure_why"]
    for task in out["tasks"]:
        rows = {r["label"]: r["best_val_loss"] for r in task["rows"]}
        assert out["measures"][task["name"]] == pytest.approx(rows)
    measures = {t: {o: math.inf if v is None else v for o, v in by.items()} for t, by in out["measures"].items()}
    for label, rho in out["profile"].items():
        wins = sum(min(measures[t].values()) == measures[t][label] for t in measures)
        assert rho[0] == wins / 2  # tau = 1: the share of tasks it was best on
        assert rho == sorted(rho)  # a fraction that can only grow with tau
    run_dir = tmp_path / "runs" / out["run_dir"].split("/")[-1]
    assert (run_dir / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {"reg", "digits"}
    assert (run_dir / "digits" / "loss.png").is_file()
    shown = cli("compare", "sgd:lr=1e-4", "adam:lr=1e-3", "-c", reg, "-c", digits, "--seeds", "1")
    text = " ".join(shown.output.split())
    assert "task reg" in text and "task digits" in text and "Performance profile over 2 tasks" in text


def test_one_task_keeps_the_plain_output(tmp_path, tiny_mnist):
    reg, _ = _configs(tmp_path, tiny_mnist)
    result = cli("compare", "sgd", "adam", "-c", reg)
    assert result.exit_code == 0, result.output
    assert "Performance profile" not in result.output and "Verdict" in result.output


def test_a_bad_second_task_fails_before_the_first_trains(tmp_path, tiny_mnist):
    reg, _ = _configs(tmp_path, tiny_mnist)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {init: glorot}\n")
    assert_user_error(cli("compare", "sgd", "-c", reg, "-c", bad), "model.init: unknown scheme 'glorot'", tmp_path)


def test_per_task_targets_make_steps_to_target_the_measure(tmp_path, tiny_mnist):
    reg, digits = _configs(tmp_path, tiny_mnist)
    # reg: a target every epoch meets (finite steps); digits: one no epoch meets (infinite for everyone)
    args = ["sgd:lr=1e-4", "adam:lr=1e-3", "-c", reg, "-c", digits, "--seeds", "2", "--json"]
    result = cli("compare", *args, "--target", "val_loss=1e9", "--target", "val_loss=1e-12")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["measure"] == "target_steps" and "AlgoPerf" in out["measure_why"]
    reg_rows = {r["label"]: r for r in out["tasks"][0]["rows"]}
    for label, steps in out["measures"]["reg"].items():
        assert reg_rows[label]["target_reached"] == 2 and steps == reg_rows[label]["target_steps"] > 0
    assert set(out["measures"]["digits"].values()) == {None}  # not reached: infinite, null in JSON
    assert out["unscored"] == {
        "reg": {},
        "digits": {"sgd:lr=1e-4": "not reached 0/2", "adam:lr=1e-3": "not reached 0/2"},
    }
    assert all(rho[-1] == 0.5 for rho in out["profile"].values())  # within any tau on reg only
    # at 80 columns the tables say why a measure is infinite and keep every name whole
    measures = {t: {o: math.inf if v is None else v for o, v in by.items()} for t, by in out["measures"].items()}
    m = SimpleNamespace(**{**out, "measures": measures})
    text = _rendered(measures_table(m, width=80)) + _rendered(profile_table(m, width=80))
    assert text.count("not reached 0/2") == 2 and "failed" not in text
    assert text.count("sgd:lr=1e-4") == 2 and text.count("adam:lr=1e-3") == 2 and "tau=1 " in text


def _rendered(table) -> str:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_targets_must_be_one_or_one_per_task(tmp_path, tiny_mnist):
    reg, digits = _configs(tmp_path, tiny_mnist)
    three = ["--target", "val_loss=1", "--target", "val_loss=2", "--target", "val_loss=3"]
    assert_user_error(cli("compare", "sgd", "-c", reg, "-c", digits, *three), "once per --config", tmp_path)
    assert_user_error(
        cli("compare", "sgd", "-c", reg, "-c", digits, "--target", "val_accuracy=0.5", "--target", "val_accuracy=0.5"),
        "val_accuracy",
        tmp_path,
    )
