"""train.precision: autocast in bf16/16, a GradScaler for 16 whose state is checkpointed, refusals."""

import json

import pytest
import torch

import optcli.engine.loop as train_mod
from optcli.config import load_config
from optcli.engine import stepping
from optcli.engine.loop import check_precision
from optcli.errors import UserError
from optcli.rundir.files import load_checkpoint
from tests.conftest import cli, mnist_args


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("16", torch.float16), ("32", torch.float32)])
def test_the_forward_pass_runs_in_the_chosen_dtype(precision, dtype, monkeypatch):
    seen = set()
    real = stepping.autocast

    def spy(p, device_type):
        ctx = real(p, device_type)

        class Recording:
            def __enter__(self):
                ctx.__enter__()
                seen.add(torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Recording()

    monkeypatch.setattr(stepping, "autocast", spy)  # the training forward pass
    monkeypatch.setattr(train_mod, "autocast", spy)  # evaluation
    from optcli.rundir.run import train_run

    cfg = load_config(None, ["train.epochs=2", f"train.precision={precision}", "data.samples=16"])
    result = train_run(cfg)
    assert result.history.status == "completed"
    assert seen == ({None} if precision == "32" else {dtype})
    layer = torch.nn.Linear(4, 4)
    with real(precision, "cpu"):
        assert layer(torch.ones(1, 4)).dtype == dtype  # and the context really casts the matmul


def test_low_precision_changes_the_numbers_but_still_trains(tmp_path):
    def final(precision):
        out = cli("train", "--epochs", "30", "--set", f"train.precision={precision}", "--json")
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["final"]["train_loss"]

    f32, bf16 = final(32), final("bf16")
    assert f32 != bf16  # bfloat16 keeps 8 bits of mantissa: the losses cannot agree to float32's 24
    assert abs(bf16 - f32) / f32 < 0.5  # but it is the same training, not another one


def test_float16_loss_scale_is_checkpointed_and_resume_is_exact(tiny_mnist, tmp_path):
    args = mnist_args(tiny_mnist, "--set", "train.precision=16", "--set", "model.dropout=0")
    assert cli("train", *args, "--epochs", "4", "--set", "name=whole").exit_code == 0
    assert cli("train", *args, "--epochs", "2", "--set", "name=part").exit_code == 0
    ckpt = load_checkpoint(tmp_path / "runs" / "part" / "last.pt")
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert cli("train", "--resume", tmp_path / "runs" / "part", "--epochs", "4").exit_code == 0
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("whole", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"]


def test_float16_with_a_closure_optimizer_is_refused(tmp_path):
    result = cli("train", "--set", "train.precision=16", "--set", "optimizer.name=lbfgs")
    assert result.exit_code == 2 and "cannot step optimizers that re-evaluate the loss" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_device_whose_autocast_falls_back_to_float32_is_refused(monkeypatch):
    import contextlib

    monkeypatch.setattr(train_mod, "autocast", lambda precision, device_type: contextlib.nullcontext())
    with pytest.raises(UserError, match="does not support torch.bfloat16"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("32", torch.device("cpu"))  # float32 is never probed


def test_precision_is_validated_as_a_key(tmp_path):
    result = cli("train", "--set", "train.precision=8")
    assert result.exit_code == 2 and "train.precision" in result.output
