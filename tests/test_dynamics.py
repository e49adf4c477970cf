import json
import math

import pytest
import torch

from optcli.config import load_config
from optcli.engine.build import build_model_and_optimizer
from optcli.engine.dynamics import SAMPLE_EVERY, Dynamics, epoch_callbacks
from optcli.engine.loop import Training, fit
from optcli.tasks import load_data
from tests.conftest import cli

# the tutorial's shapes, pinned so that the step sizes below do not depend on the default task
TASK = ["data.samples=64", "data.inputs=1000", "data.outputs=10", "model.hidden=[100]", "train.reduction=sum"]


def run(optimizer: str, epochs: int = 3, **kwargs):
    cfg = load_config(None, [*TASK, f"optimizer.name={optimizer}", f"train.epochs={epochs}", "data.batch_size=16"])
    cfg.optimizer = cfg.optimizer.model_copy(update=kwargs)
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer_, scheduler = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    dynamics = Dynamics(model, optimizer_)
    history = fit(Training(cfg, model, optimizer_, scheduler, data), callbacks=[dynamics])
    dynamics.close()
    return model, history


def test_plain_sgd_step_size_is_its_learning_rate():
    model, history = run("sgd", lr=1e-4)
    for e in history.epochs:
        for layer in ("fc1", "out"):
            d = e.dynamics["layers"][layer]
            # ||Δw|| is read back as w_new - w_old in float32, exact up to ulp(w) ~ 2**-24 ||w|| per element;
            # with updates above 1e-3 of the weights that is below 2**-24 / 1e-3 ~ 6e-5 relative
            assert d["update_ratio"] > 1e-3
            assert d["step_size"] == pytest.approx(1e-4, rel=1e-3)
            assert d["grad_norm"] > 0 and d["epoch_update_ratio"] > 0


def test_first_adam_step_moves_each_weight_by_at_most_lr_whatever_the_gradient():
    model, history = run("adam", epochs=1, lr=1e-3)
    cfg = load_config(None, TASK)
    initial, _, _ = build_model_and_optimizer(cfg, load_data(cfg.data, torch.device("cpu")), torch.device("cpu"))
    for layer in ("fc1", "out"):
        d = history.epochs[0].dynamics["layers"][layer]
        w0 = [p for n, p in initial.named_parameters() if n.startswith(layer + ".")]
        numel = sum(p.numel() for p in w0)
        update = d["update_ratio"] * torch.sqrt(sum(p.detach().square().sum() for p in w0)).item()
        # step 1: m̂ = g and v̂ = g², so each weight moves by lr * |g| / (|g| + eps) <= lr (0 where g = 0):
        # ||Δw|| <= lr sqrt(numel), however large the gradient (SGD's step would scale with it). Slack: the bias
        # correction 1 - 0.999 taken in float32 is off by up to 2**-24 / 1e-3 ~ 6e-5 relative, so 1e-4
        assert 0.5 * 1e-3 * numel**0.5 < update <= 1e-3 * numel**0.5 * (1 + 1e-4)


def test_optimizer_state_bytes():
    sizes = {}
    for name, kwargs in (("sgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {})):
        model, history = run(name, epochs=1, **kwargs)
        sizes[(name, bool(kwargs))] = history.epochs[-1].dynamics["state_bytes"]
    params = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    assert sizes[("sgd", False)] == 0  # plain SGD keeps nothing
    assert sizes[("sgd", True)] == 4 * params  # one float32 momentum buffer per parameter
    assert sizes[("adam", False)] == 2 * 4 * params + 4 * tensors  # exp_avg, exp_avg_sq, a float32 step per tensor


def test_hooks_are_removed_on_close():
    cfg = load_config(None, ["train.epochs=1"])
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    Dynamics(model, optimizer).close()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_compare_shows_state_size_and_draws_dynamics(tmp_path):
    result = cli("compare", "sgd", "adam", "--epochs", "3", "--set", "name=c")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "c"
    assert "optimizer state" in result.output and "0 B" in result.output
    rows = {r["label"]: r for r in json.loads((run_dir / "summary.json").read_text())["rows"]}
    assert rows["sgd"]["state_bytes"] == 0 and rows["adam"]["state_bytes"] > 0
    assert (run_dir / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "dynamics" not in header  # nested values go to summary.json and metrics.jsonl only


def test_dynamics_can_be_turned_off(tmp_path):
    result = cli("train", "--epochs", "2", "--set", "train.dynamics=false", "--set", "name=r")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["dynamics"] is None


def test_grad_norm_is_the_rms_over_every_sample_every_th_step():
    # 64 training samples in batches of 2: 32 steps per epoch, sampled at steps 1, 11, 21 and 31 of each epoch
    cfg = load_config(None, [*TASK, "optimizer.name=sgd", "train.epochs=2", "data.batch_size=2", "data.samples=80"])
    data = load_data(cfg.data, torch.device("cpu"))
    assert len(data.train) == 64
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    seen: list[dict[str, float]] = []  # per step, each layer's squared gradient norm, in float64

    def record(*_):
        layers: dict[str, float] = {}
        for name, p in model.named_parameters():
            layer = name.rpartition(".")[0]
            layers[layer] = layers.get(layer, 0.0) + p.grad.double().square().sum().item()
        seen.append(layers)

    optimizer.register_step_pre_hook(record)
    dynamics = Dynamics(model, optimizer)
    history = fit(Training(cfg, model, optimizer, scheduler, data), callbacks=[dynamics])
    dynamics.close()
    assert len(seen) == 64
    for e, epoch in enumerate(history.epochs):
        sampled = seen[32 * e : 32 * (e + 1)][::SAMPLE_EVERY]
        assert len(sampled) == 4
        for layer, d in epoch.dynamics["layers"].items():
            rms = math.sqrt(sum(s[layer] for s in sampled) / len(sampled))
            # float32 norms (torch sums in blocks, error about log2(n) u for n <= 1e5 terms, u = 2**-24) against
            # float64 ones: 1e-5 relative is loose; the RMS over all 32 steps differs by far more (checked below)
            assert d["grad_norm"] == pytest.approx(rms, rel=1e-5)
        every = math.sqrt(sum(s["fc1"] for s in seen[32 * e : 32 * (e + 1)]) / 32)
        assert epoch.dynamics["layers"]["fc1"]["grad_norm"] != pytest.approx(every, rel=1e-3)


def test_no_dynamics_no_hooks():
    cfg = load_config(None, ["train.epochs=1", "train.dynamics=false"])
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    assert epoch_callbacks(cfg, model, optimizer) == []
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
