import pytest

from optcli.config import load_config, parse_yaml, to_yaml, validate
from optcli.errors import UserError
from tests.conftest import cli


def test_tutorial_config_is_the_pytorch_tutorial_regression(repo_root):
    cfg = load_config(repo_root / "configs" / "tutorial.yaml")
    assert (cfg.data.name, cfg.data.target, cfg.data.samples, cfg.data.inputs, cfg.data.outputs) == (
        "regression",
        "random",
        64,
        1000,
        10,
    )
    assert (cfg.data.batch_size, cfg.data.val_fraction, cfg.model.hidden) == (64, 0.0, [100])
    assert (cfg.optimizer.name, cfg.optimizer.kwargs["lr"]) == ("adam", 1e-4)
    assert (cfg.train.loss, cfg.train.reduction, cfg.train.epochs) == ("mse", "sum", 500)


def test_default_task_is_the_teacher_regression_with_a_validation_split():
    cfg = load_config()
    assert (cfg.data.name, cfg.data.target, cfg.data.val_fraction > 0) == ("regression", "teacher", True)
    assert cfg.optimizer.kwargs == {}  # torch's defaults, so that compare applies no lr to every optimizer


def test_shipped_regression_config_equals_builtin_default(repo_root):
    assert load_config(repo_root / "configs" / "regression.yaml").model_dump() == load_config().model_dump()


def test_shipped_mnist_config(repo_root):
    cfg = load_config(repo_root / "configs" / "mnist_mlp.yaml")
    assert cfg.model.hidden == [512, 512] and cfg.model.dropout == 0.2 and cfg.data.batch_size == 128
    assert cfg.train.loss == "cross_entropy" and cfg.optimizer.name in ("adam", "rmsprop")


def test_set_overrides_parse_values_as_yaml():
    cfg = load_config(
        None, ["model.hidden=[256,128]", "optimizer.lr=3e-4", "optimizer.momentum=0.9", "data.download=false", "seed=7"]
    )
    assert cfg.model.hidden == [256, 128]
    assert cfg.optimizer.kwargs == {"lr": 3e-4, "momentum": 0.9}
    assert cfg.data.download is False and cfg.seed == 7


def test_exponent_floats_without_a_dot_are_floats():
    assert parse_yaml("lr: 1e-3") == {"lr": 0.001}
    assert parse_yaml("x: 1e") == {"x": "1e"}


def test_unknown_key_in_file_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hiden: [3]\n")
    with pytest.raises(UserError, match=r"c.yaml: model.hiden: unknown key \(did you mean 'hidden'\?\)"):
        load_config(path)


def test_config_error_exits_2_with_key_path_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_size: -4\n")
    result = cli("train", "--config", path)
    assert result.exit_code == 2, result.output
    assert "data.batch_size" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_print_config_shows_the_resolved_config():
    result = cli("train", "--print-config", "--set", "optimizer.lr=0.5", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    cfg = validate(parse_yaml(result.output))
    assert cfg.optimizer.kwargs["lr"] == 0.5 and cfg.train.epochs == 3


def test_to_yaml_round_trips():
    cfg = load_config(None, ["optimizer.betas=[0.8,0.9]", "scheduler={name: steplr, step_size: 2}"])
    assert validate(parse_yaml(to_yaml(cfg))).model_dump() == cfg.model_dump()
