"""Optimizers beyond torch.optim: pytorch-optimizer's registry, import paths, schedule-free modes, closures."""

import json

import pytest
import torch

import optcli.engine.loop as train_mod
from optcli.config import load_config
from optcli.engine import stepping
from optcli.engine.build import build_model_and_optimizer
from optcli.engine.optimizers import canonical_name, resolve_optimizer
from optcli.rundir.files import load_checkpoint
from optcli.tasks import load_data
from tests.conftest import assert_user_error, cli, mnist_args

pytest.importorskip("pytorch_optimizer")
pytest.importorskip("schedulefree")

CUSTOM = "tests.helpers.custom_optim:SignDescent"
SCHEDULE_FREE = "schedulefree.AdamWScheduleFree"


def _sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _only_run(tmp_path):
    (run,) = (tmp_path / "runs").iterdir()
    return run


@pytest.mark.parametrize("name, lr", [("lion", 1e-4), ("adan", 1e-3), ("prodigy", 1.0), (CUSTOM, 1e-3)])
def test_registry_and_import_path_optimizers_train(name, lr, tmp_path):
    result = cli("train", *_sets(f"optimizer.name={name}", f"optimizer.lr={lr}", "train.epochs=8"))
    assert result.exit_code == 0, result.output
    rows = _rows(_only_run(tmp_path))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_resolution_order_torch_then_registry_then_import_path():
    import pytorch_optimizer

    assert resolve_optimizer("adam") is torch.optim.Adam  # the registry also has "adam": torch wins
    assert resolve_optimizer("Lion") is pytorch_optimizer.Lion
    assert resolve_optimizer("pytorch_optimizer.Lion") is pytorch_optimizer.Lion
    assert resolve_optimizer("pytorch_optimizer:Lion") is pytorch_optimizer.Lion
    assert resolve_optimizer("pytorch_optimizer.RAdam") is not torch.optim.RAdam  # the path names the zoo's own
    from tests.helpers.custom_optim import SignDescent

    assert resolve_optimizer(CUSTOM) is SignDescent
    for cls in (torch.optim.Adam, pytorch_optimizer.Lion, SignDescent, pytorch_optimizer.RAdam):
        assert resolve_optimizer(canonical_name(cls)) is cls  # what a worker process resolves again


def test_import_path_optimizer_follows_its_own_rule():
    cfg = load_config(None, [f"optimizer.name={CUSTOM}", "optimizer.lr=0.5", "optimizer.scale=0.1"])
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    model(data.train.x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        # sign() is exact and 0.05 * (+-1) is one rounding; subtracting it from b is a second: a few ulps of b
        torch.testing.assert_close(p.detach(), b - 0.05 * torch.sign(g), rtol=2e-7, atol=1e-8)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--set", "optimizer.name=lionn"], "unknown name 'lionn' (did you mean 'lion'?)"),
        (["compare", "adam", "adann"], "unknown name 'adann' (did you mean 'adan'?)"),
        (["inspect-params", "--optimizer", "prodigi"], "unknown name 'prodigi' (did you mean 'prodigy'?)"),
        (["train", "--set", "optimizer.name=lion", "--set", "optimizer.beta=[0.9,0.99]"], "did you mean 'betas'?"),
        # SignDescent's **kwargs would swallow a typo: only named parameters count
        (["train", "--set", f"optimizer.name={CUSTOM}", "--set", "optimizer.scal=2"], "takes no argument 'scal'"),
        (["train", "--set", "optimizer.name=tests.helpers.custom_optim:SignDescnt"], "did you mean 'SignDescent'?"),
        (["train", "--set", "optimizer.name=json.JSONDecoder"], "is not a torch.optim.Optimizer subclass"),
        (["train", "--set", "optimizer.name=nosuchpkg.mod:Opt"], "cannot import 'nosuchpkg.mod'"),
        (["compare", "lion:betas=[2,0.9]"], "cannot train this model"),
    ],
)
def test_bad_names_and_keywords_are_one_line_errors(args, fragment, tmp_path):
    assert_user_error(cli(*args), fragment, tmp_path)


def test_param_groups_checkpoint_and_resume_work_for_a_registry_optimizer(tmp_path):
    common = _sets(
        "optimizer.name=adan",
        "optimizer.weight_decay=0.02",
        "optimizer.groups=[{params: ['*.bias'], weight_decay: 0.0}]",
        "data.batch_size=16",
    )
    assert cli("train", *common, *_sets("train.epochs=4", "name=whole")).exit_code == 0
    assert cli("train", *common, *_sets("train.epochs=2", "name=part")).exit_code == 0
    result = cli("train", "--resume", tmp_path / "runs" / "part", "--set", "train.epochs=4")
    assert result.exit_code == 0, result.output
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("whole", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    decay = {g["weight_decay"] for g in a["optimizer"]["param_groups"]}
    assert decay == {0.02, 0.0}
    inspected = cli("inspect-params", "--checkpoint", tmp_path / "runs" / "whole", "--json")
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.stdout)
    assert info["optimizer"] == "Adan" and any(s["key"] == "exp_avg_diff" for s in info["optimizer_state"])


def test_compare_names_zoo_and_import_path_optimizers(tmp_path):
    result = cli("compare", "adam", "lion:lr=1e-4", CUSTOM + ":lr=1e-3", "--epochs", "4", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["label"]: r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"adam", "lion:lr=1e-4", CUSTOM.lower() + ":lr=1e-3"}
    assert all(r["status"] == "completed" for r in rows.values())
    assert rows["lion:lr=1e-4"]["optimizer"] == "Lion"


def test_optimizers_lists_the_zoo_with_its_source():
    result = cli("optimizers", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["Lion"]["source"] == "pytorch-optimizer" and rows["Adam"]["source"] == "torch.optim"
    assert rows["Prodigy"]["defaults"]["lr"] == 1.0
    assert rows["ScheduleFreeAdamW"]["modes"] == "train/eval" and rows["Adam"]["modes"] is None


# --- schedule-free: train()/eval() with the model ---------------------------------------------------------


def _fit_schedule_free(monkeypatch, switch: bool, tiny_mnist):
    cfg = load_config(
        None,
        [a for a in mnist_args(tiny_mnist) if a != "--set"]
        + [f"optimizer.name={SCHEDULE_FREE}", "optimizer.lr=0.01", "train.epochs=3"],
    )
    if not switch:
        monkeypatch.setattr(train_mod, "set_mode", lambda optimizer, training: None)
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    optimizer.train()  # without the switch it must at least be able to step
    return train_mod.fit(train_mod.Training(cfg, model, optimizer, scheduler, data)), optimizer


def test_schedule_free_switch_changes_the_validation_loss(monkeypatch, tiny_mnist):
    switched, optimizer = _fit_schedule_free(monkeypatch, True, tiny_mnist)
    assert stepping.optimizer_mode(optimizer) == "eval"  # evaluated, and left for saving, in eval mode
    unswitched, optimizer = _fit_schedule_free(monkeypatch, False, tiny_mnist)
    assert stepping.optimizer_mode(optimizer) == "train"
    # the same training steps (train mode in both), evaluated at other weights: x (averaged) against y
    a = [e.train_loss for e in switched.epochs]
    b = [e.train_loss for e in unswitched.epochs]
    assert a[0] == b[0]
    va, vb = switched.epochs[-1].val_loss, unswitched.epochs[-1].val_loss
    assert abs(va - vb) > 1e-3 * va, (va, vb)  # far beyond float32 noise (~1e-7 relative)


def test_schedule_free_checkpoint_is_in_eval_mode_and_resumes_exactly(tmp_path):
    common = _sets(f"optimizer.name={SCHEDULE_FREE}", "optimizer.lr=0.003", "data.batch_size=16")
    assert cli("train", *common, *_sets("train.epochs=4", "name=whole")).exit_code == 0
    assert cli("train", *common, *_sets("train.epochs=2", "name=part")).exit_code == 0
    part = load_checkpoint(tmp_path / "runs" / "part" / "last.pt")
    assert all(g["train_mode"] is False for g in part["optimizer"]["param_groups"])
    assert cli("train", "--resume", tmp_path / "runs" / "part", "--set", "train.epochs=4").exit_code == 0
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("whole", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "runs" / "part")) == strip(_rows(tmp_path / "runs" / "whole"))
    shown = cli("inspect-params", "--checkpoint", tmp_path / "runs" / "whole")
    assert shown.exit_code == 0, shown.output
    assert "optimizer mode: eval" in " ".join(shown.output.split())


def test_inspect_params_steps_a_zoo_optimizer_and_shows_its_mode():
    result = cli("inspect-params", "--optimizer", "schedulefreeadamw", "--step", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["optimizer"] == "ScheduleFreeAdamW" and info["optimizer_mode"] == "train"
    assert all(p["changed"] for p in info["step"]["params"])
    plain = json.loads(cli("inspect-params", "--json").stdout)
    assert plain["optimizer_mode"] is None


# --- closure optimizers beyond LBFGS ------------------------------------------------------------------


def test_sam_goes_through_the_closure_path_with_two_evaluations_per_step(monkeypatch, tmp_path):
    import pytorch_optimizer

    forwards = []
    real_forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: (forwards.append(1), real_forward(self, x))[1])
    cfg = load_config(
        None,
        ["optimizer.name=pytorch_optimizer.SAM", "optimizer.base_optimizer=adam", "optimizer.lr=1e-3"]
        + ["train.epochs=5", "data.batch_size=16", "data.samples=64", "data.val_fraction=0"],
    )
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    assert isinstance(optimizer, pytorch_optimizer.SAM) and isinstance(optimizer.base_optimizer, torch.optim.Adam)
    assert stepping.needs_closure(optimizer) and stepping.gradient_before_closure(optimizer)
    assert not stepping.gradient_before_closure(torch.optim.LBFGS) and stepping.needs_closure(torch.optim.LBFGS)
    forwards.clear()
    history = train_mod.fit(train_mod.Training(cfg, model, optimizer, scheduler, data))
    steps, layers = 5 * 4, 2  # 64 samples in batches of 16; two Linear layers
    assert len(forwards) == steps * layers * 2  # the gradient at w, then at the perturbed weights
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss


def test_closure_optimizer_that_cannot_train_is_refused_in_one_line(tmp_path):
    # AdaHessian needs backward(create_graph=True) for its Hessian estimate: neither way of stepping works
    assert_user_error(cli("train", "--set", "optimizer.name=adahessian"), "cannot train this model", tmp_path)
