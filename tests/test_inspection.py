import json

import pytest
import torch
from torch import nn

from optcli.config import load_config
from optcli.engine.model import build_model
from optcli.engine.optimizers import build_optimizer
from optcli.inspection import check_linkage, inspect_params
from tests.conftest import assert_user_error, cli


def test_frozen_parameters_show_and_are_not_trainable():
    r = inspect_params(load_config(None, ["model.freeze=['fc1.*']"]))
    frozen = {p["name"] for p in r.params if not p["requires_grad"]}
    assert frozen == {"fc1.weight", "fc1.bias"}
    assert r.totals["frozen"] == 20 * 64 + 64  # the default task: 20 inputs, 64 hidden units, 1 output
    assert r.totals["trainable"] == 64 * 1 + 1
    held = {n for g in r.groups for n in g["params"]}
    assert held == {"out.weight", "out.bias"}
    assert r.linkage["ok"] and r.linkage["trainable"] == 2


def test_replacing_a_parameter_after_building_the_optimizer_is_caught():
    cfg = load_config(None, [])
    model = build_model(cfg.model, 1000, 10)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    assert check_linkage(model, optimizer)["ok"]
    model.fc1.weight = nn.Parameter(torch.zeros(100, 1000))
    link = check_linkage(model, optimizer)
    assert not link["ok"]
    assert link["missing"] == ["fc1.weight"] and link["stale"] == ["fc1.weight"]
    assert any("no longer has" in p for p in link["problems"])


def test_step_on_sgd_matches_w_minus_lr_grad():
    r = inspect_params(load_config(None, ["model.dropout=0.3"]), optimizer_spec="sgd:lr=0.01", step=True)
    rule = r.step["sgd_rule"]
    assert rule["applies"] and rule["holds"] and rule["max_abs_error"] < 1e-6
    rows = {p["name"]: p for p in r.step["params"]}
    assert rows["fc1.weight"]["update_norm"] == pytest.approx(0.01 * rows["fc1.weight"]["grad_norm"], rel=1e-4)


def test_sgd_rule_is_not_claimed_for_momentum():
    r = inspect_params(load_config(None, []), optimizer_spec="sgd:lr=0.01,momentum=0.9", step=True)
    assert r.step["sgd_rule"]["applies"] is False


def test_second_backward_without_zero_grad_doubles_the_gradient():
    r = inspect_params(load_config(None, ["model.dropout=0.5"]), step=True)
    acc = r.step["accumulation"]
    assert acc["doubled"] and acc["max_abs_error_vs_2x"] == 0.0
    assert acc["grad_norm_ratio_min"] == pytest.approx(2.0) and acc["grad_norm_ratio_max"] == pytest.approx(2.0)


def test_buffers_are_listed_as_buffers():
    r = inspect_params(load_config(None, ["model.batch_norm=true", "model.hidden=[8,4]"]))
    kinds = {e["key"]: e["kind"] for e in r.state_dict}
    for i in (1, 2):
        assert (
            kinds[f"bn{i}.running_mean"]
            == kinds[f"bn{i}.running_var"]
            == kinds[f"bn{i}.num_batches_tracked"]
            == "buffer"
        )
        assert kinds[f"bn{i}.weight"] == "parameter"
    assert {m["type"] for m in r.modes["modules"]} == {"BatchNorm1d"}


def test_modes_list_dropout_and_batchnorm():
    r = inspect_params(load_config(None, ["model.batch_norm=true", "model.dropout=0.2"]))
    assert [(m["name"], m["type"]) for m in r.modes["modules"]] == [("bn1", "BatchNorm1d"), ("drop1", "Dropout")]
    assert r.modes["training"] is True


def test_checkpoint_optimizer_state_is_summarized(tmp_path):
    args = ("--set", "train.epochs=3", "--set", "data.batch_size=1000")  # one full batch: one step per epoch
    assert cli("train", *args, "--set", "name=r").exit_code == 0
    result = cli("inspect-params", "--checkpoint", tmp_path / "runs" / "r" / "last.pt", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    keys = {(s["param"], s["key"]) for s in r["optimizer_state"]}
    assert ("fc1.weight", "exp_avg") in keys and ("fc1.weight", "exp_avg_sq") in keys
    step = next(s for s in r["optimizer_state"] if s["key"] == "step")
    assert step["value"] == 3.0
    assert r["optimizer"] == "Adam"


def test_json_agrees_with_the_table():
    result = cli("inspect-params", "--json", "--set", "model.hidden=[7]")
    table = cli("inspect-params", "--set", "model.hidden=[7]")
    assert result.exit_code == 0 and table.exit_code == 0, table.output
    r = json.loads(result.stdout)
    assert r["totals"]["total"] == 20 * 7 + 7 + 7 * 1 + 1
    assert f"total {r['totals']['total']:,} elements" in table.output
    for p in r["params"]:
        assert p["name"] in table.output


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "x.pt"
    bogus.write_text("hello")
    result = cli("inspect-params", "--checkpoint", bogus)
    assert result.exit_code == 2 and "not a readable checkpoint" in result.output and "Traceback" not in result.output
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    result = cli("inspect-params", "--checkpoint", tmp_path / "y.pt")
    assert result.exit_code == 2 and "not an optcli checkpoint" in result.output


def test_a_model_too_big_for_memory_is_one_line_not_the_allocators_traceback(tmp_path):
    result = cli("inspect-params", "--set", "model.hidden=[1000000000,10]")
    assert_user_error(result, "error: model: needs about", tmp_path)
    assert "more than the" in result.output and "make model.hidden smaller" in result.output
