"""Configs and specs a user gets wrong in ways that used to pass: a key given twice, a seed out of numpy's range,
and a top-level module's optimizer in a compare spec (accepted by optimizer.name, refused by compare)."""

import json

import pytest
import yaml

from optcli.config import SEED_MAX, check_seed
from optcli.errors import UserError
from tests.conftest import assert_user_error, cli

TWICE = """\
seed: 1
optimizer:
  name: sgd
  lr: 0.1
  momentum: 0.9
  lr: 0.2
"""


@pytest.mark.parametrize("command", [["train"], ["compare", "sgd", "adam"], ["lr-find"], ["inspect-params"]])
def test_a_key_given_twice_names_its_path_the_file_and_both_lines(command, tmp_path):
    (tmp_path / "twice.yaml").write_text(TWICE)
    result = cli(*command, "-c", "twice.yaml")
    assert_user_error(result, "twice.yaml:6:3: invalid YAML: optimizer.lr: given twice (lines 4 and 6)", tmp_path)
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("seed: 1\ntrain: {epochs: 2}\nseed: 2\n", "c.yaml:3:1: invalid YAML: seed: given twice (lines 1 and 3)"),
        (  # inside a list: the index is part of the path
            "optimizer:\n  name: adamw\n  groups:\n    - params: ['*.bias']\n      weight_decay: 0.0\n"
            "      weight_decay: 0.1\n",
            "c.yaml:6:7: invalid YAML: optimizer.groups.0.weight_decay: given twice (lines 5 and 6)",
        ),
        ("optimizer: {lr: 0.1, lr: 0.2}\n", "optimizer.lr: given twice (columns 13 and 22)"),
    ],
)
def test_duplicates_anywhere_are_refused(text, fragment, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    assert_user_error(cli("train", "-c", "c.yaml"), fragment, tmp_path)


def test_a_merged_key_may_be_overridden_and_a_set_value_is_checked_too(tmp_path):
    # `<<: *base` brings lr in; the section's own lr overrides it, as YAML's merge key means
    text = "optimizer:\n  <<: {lr: 0.5, momentum: 0.9}\n  name: sgd\n  lr: 0.25\n"
    (tmp_path / "m.yaml").write_text(text)
    result = cli("train", "-c", "m.yaml", "--print-config")
    assert result.exit_code == 0, result.output
    optimizer = yaml.safe_load(result.stdout)["optimizer"]
    assert (optimizer["lr"], optimizer["momentum"]) == (0.25, 0.9)
    result = cli("train", "--set", "optimizer={name: sgd, lr: 1, lr: 2}")
    assert_user_error(result, "(lr: given twice (columns 13 and 20))", tmp_path)


RULE = "must be an integer in [0, 2**32 - 1 = 4294967295] (numpy's seed range)"


@pytest.mark.parametrize(
    "item, shown",
    [
        ("seed=18446744073709551616", "seed: " + RULE + " (got 18446744073709551616)"),  # was an OverflowError
        ("seed=9223372036854775807", "seed: " + RULE + " (got 9223372036854775807)"),  # was a failed run
        ("seed=4294967296", "seed: " + RULE + " (got 4294967296)"),
        ("seed=-1", "seed: " + RULE + " (got -1)"),
        ("seed=1.5", "seed: " + RULE + " (got 1.5)"),
        ("seed=true", "seed: " + RULE + " (got True)"),
        ("data.seed=4294967296", "data.seed: " + RULE + " (got 4294967296)"),
        ("data.seed=-3", "data.seed: " + RULE + " (got -3)"),
    ],
)
@pytest.mark.parametrize("command", [["train"], ["compare", "sgd"], ["lr-find"]])
def test_seeds_outside_numpys_range_are_refused_naming_the_key(command, item, shown, tmp_path):
    result = cli(*command, "--set", item)
    assert_user_error(result, "error: config: " + shown, tmp_path)


def test_the_largest_seeds_are_accepted(tmp_path):
    result = cli("train", "--set", f"seed={SEED_MAX}", "--set", f"data.seed={SEED_MAX}", "--print-config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["seed"] == SEED_MAX == 2**32 - 1


def test_check_seed_names_where_a_made_seed_came_from():
    assert check_seed(SEED_MAX, "--seeds") == SEED_MAX
    with pytest.raises(UserError, match=r"^--seeds 2 from seed 4294967295: the last seed: must be an integer in"):
        check_seed(SEED_MAX + 1, "--seeds 2 from seed 4294967295: the last seed")


def test_compare_seeds_running_past_numpys_range_are_refused(tmp_path):
    result = cli("compare", "sgd", "--seeds", "2", "--epochs", "1", "--set", f"seed={SEED_MAX}")
    assert_user_error(result, "--seeds 2 from seed 4294967295: the last seed: " + RULE, tmp_path)


MODULE = """\
from tests.helpers.custom_optim import SignDescent


class SignSGD(SignDescent):
    pass
"""


@pytest.fixture
def top_level_module(tmp_path, monkeypatch):
    """`mymodule` importable as a top-level module (no package, no dot in its import path)."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "mymodule.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(__import__("sys").modules, "mymodule", raising=False)
    return "mymodule:SignSGD"


def test_a_top_level_module_path_works_in_compare_as_in_optimizer_name(top_level_module, tmp_path):
    train = cli("train", "--set", f"optimizer.name={top_level_module}", "--epochs", "1", "--set", "name=t")
    assert train.exit_code == 0, train.output
    args = ["--seeds", "1", "--epochs", "2", "--json"]
    result = cli("compare", "sgd", top_level_module, f"{top_level_module}:lr=0.001,scale=2", *args)
    assert result.exit_code == 0, result.output
    rows = {r["label"]: r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"sgd", "signsgd", "mymodule:signsgd:lr=0.001,scale=2"}  # a bare name: the class's
    assert rows["signsgd"]["optimizer"] == "mymodule:SignSGD"
    assert all(r["status"] == "completed" for r in rows.values())


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("adam:amsgrad", "optimizer spec 'adam:amsgrad': expected key=value, got 'amsgrad'"),  # a torch name
        ("mymodule:SignSGDD", "mymodule has no 'SignSGDD'"),
        ("nosuchmodule:SignSGD", "cannot import 'nosuchmodule'"),
    ],
)
def test_specs_near_an_import_path_still_say_what_is_wrong(top_level_module, spec, fragment, tmp_path):
    assert_user_error(cli("compare", "sgd", spec), fragment, tmp_path)
