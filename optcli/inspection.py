"""What a model and its optimizer hold, as plain data: parameters and whether they require grad, the
state_dict's parameters and buffers, param_groups, per-parameter optimizer state, whether the optimizer
still holds the model's own parameters, and what one backward() and step() do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from optcli.config import Config, optimizer_config, validate
from optcli.engine.build import build_task_model, seed_torch, torch_settings
from optcli.engine.feasibility import check_memory
from optcli.engine.loop import make_loss
from optcli.engine.optimizers import (
    build_optimizer,
    canonical_name,
    needs_closure,
    parse_spec,
    resolve_optimizer,
    step_with_closure,
)
from optcli.engine.stepping import optimizer_mode, set_mode
from optcli.errors import UserError
from optcli.rundir.files import load_checkpoint
from optcli.rundir.preflight import preflight
from optcli.tasks import epoch_permutation, load_data, task_shape

SHOW_VALUES_UP_TO = 4  # elements: a parameter this small is shown in full by --step
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@dataclass
class Inspection:
    source: str
    optimizer: str
    params: list[dict]
    totals: dict
    state_dict: list[dict]
    groups: list[dict]
    optimizer_state: list[dict]
    linkage: dict
    modes: dict
    step: dict | None = None
    notes: list[str] = field(default_factory=list)
    optimizer_mode: str | None = None  # "train" | "eval" for optimizers with modes (schedule-free), else None

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().float()
    return {
        "mean": t.mean().item(),
        "std": t.std().item() if t.numel() > 1 else 0.0,
        "min": t.min().item(),
        "max": t.max().item(),
        "norm": t.norm().item(),
    }


def describe_params(model: nn.Module) -> tuple[list[dict], dict]:
    rows: list[dict[str, Any]] = [
        {
            "name": n,
            "shape": list(p.shape),
            "numel": p.numel(),
            "dtype": str(p.dtype).removeprefix("torch."),
            "device": str(p.device),
            "requires_grad": p.requires_grad,
            **tensor_stats(p),
        }
        for n, p in model.named_parameters()
    ]
    trainable = sum(r["numel"] for r in rows if r["requires_grad"])
    frozen = sum(r["numel"] for r in rows if not r["requires_grad"])
    return rows, {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def describe_state_dict(model: nn.Module) -> list[dict]:
    params = {n for n, _ in model.named_parameters()}
    buffers = {n for n, _ in model.named_buffers()}
    return [
        {
            "key": k,
            "kind": "parameter" if k in params else "buffer" if k in buffers else "other",
            "shape": list(v.shape),
            "dtype": str(v.dtype).removeprefix("torch."),
        }
        for k, v in model.state_dict().items()
    ]


def param_names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def describe_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict]:
    names = param_names_by_id(model)
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        hyper = {
            k: (float(v) if isinstance(v, torch.Tensor) else v)
            for k, v in g.items()
            if k not in ("params", "param_names")
        }
        held = [names.get(id(p), f"<not in model: {tuple(p.shape)}>") for p in g["params"]]
        groups.append(
            {"index": i, "hyperparameters": hyper, "params": held, "numel": sum(p.numel() for p in g["params"])}
        )
    return groups


def describe_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict]:
    names = param_names_by_id(model)
    rows = []
    for p, state in optimizer.state.items():
        for key, value in state.items():
            row = {"param": names.get(id(p), "<not in model>"), "key": key}
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                row.update(shape=list(value.shape), norm=value.float().norm().item(), value=None)
            else:
                row.update(
                    shape=[],
                    norm=None,
                    value=float(value) if isinstance(value, (torch.Tensor, int, float)) else str(value),
                )
            rows.append(row)
    return rows


def check_linkage(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Does the optimizer hold the model's own trainable tensors, by identity? Replacing `layer.weight` with a
    new nn.Parameter after the optimizer was built leaves it stepping a tensor the model no longer uses."""
    in_model = param_names_by_id(model)
    held = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    group_names = {
        id(p): n for g in optimizer.param_groups for p, n in zip(g["params"], g.get("param_names", []), strict=False)
    }
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    stale = [group_names.get(i, f"tensor of shape {tuple(p.shape)}") for i, p in held.items() if i not in in_model]
    frozen_held = [n for n, p in model.named_parameters() if not p.requires_grad and id(p) in held]
    ok = not missing and not stale
    problems = []
    if missing:
        problems.append(
            f"trainable parameters the optimizer does not hold (they will never be updated): {', '.join(missing)}"
        )
    if stale:
        problems.append(
            f"tensors the optimizer holds that the model no longer has (replaced after the optimizer "
            f"was built?): {', '.join(stale)}"
        )
    return {
        "ok": ok,
        "missing": missing,
        "stale": stale,
        "frozen_held": frozen_held,
        "held": len(held),
        "trainable": sum(1 for p in model.parameters() if p.requires_grad),
        "problems": problems,
    }


def describe_modes(model: nn.Module) -> dict:
    modules = [
        {
            "name": n,
            "type": type(m).__name__,
            "training": m.training,
            "train": "random zeroing, scaled by 1/(1-p)"
            if isinstance(m, nn.modules.dropout._DropoutNd)
            else "normalizes with batch statistics, updates running_mean/var",
            "eval": "identity" if isinstance(m, nn.modules.dropout._DropoutNd) else "normalizes with running_mean/var",
        }
        for n, m in model.named_modules()
        if isinstance(m, MODE_DEPENDENT)
    ]
    return {"training": model.training, "modules": modules}


def one_step(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """One batch through zero_grad, forward, backward, step; then the gradient-accumulation experiment."""
    data = load_data(cfg.data, device)
    idx = epoch_permutation(len(data.train), cfg.seed, 1, device)[: cfg.data.batch_size]
    x, y = data.train.x[idx], data.train.y[idx]
    loss_fn = make_loss(cfg)
    params = [(n, p) for n, p in model.named_parameters()]

    def forward_backward() -> torch.Tensor:
        seed_torch(cfg.seed)  # the same dropout mask on every pass over this batch
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    model.train()
    set_mode(optimizer, training=True)
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params}
    before = {n: p.detach().clone() for n, p in params}
    if needs_closure(optimizer):
        step_with_closure(optimizer, lambda: (optimizer.zero_grad(), forward_backward())[1])
    else:
        optimizer.step()
    rows = []
    for n, p in params:
        update = p.detach() - before[n]
        rows.append(
            {
                "name": n,
                "requires_grad": p.requires_grad,
                "grad_norm": None if (g := grads[n]) is None else g.norm().item(),
                "update_norm": update.norm().item(),
                "changed": bool(update.abs().max() > 0),
                # a parameter of a few numbers (a 2-D test function's point) is shown whole
                "values": None
                if p.numel() > SHOW_VALUES_UP_TO
                else {
                    "before": before[n].flatten().tolist(),
                    "grad": None if (g := grads[n]) is None else g.flatten().tolist(),
                    "after": p.detach().flatten().tolist(),
                },
            }
        )
    out: dict[str, Any] = {
        "loss": loss.item(),
        "batch_size": len(x),
        "params": rows,
        "sgd_rule": sgd_rule_check(optimizer, model, before, grads),
    }
    # A second backward() without zero_grad() adds to .grad instead of replacing it.
    optimizer.zero_grad(set_to_none=True)
    forward_backward()
    first = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    forward_backward()
    errors = [(p.grad - 2 * first[n]).abs().max().item() for n, p in params if p.grad is not None]
    ratio = [(p.grad.norm() / first[n].norm()).item() for n, p in params if p.grad is not None and first[n].norm() > 0]
    out["accumulation"] = {
        "grad_norm_ratio_min": min(ratio),
        "grad_norm_ratio_max": max(ratio),
        "max_abs_error_vs_2x": max(errors),
        "doubled": max(errors) <= 1e-5 * max(1.0, max(first[n].abs().max().item() for n in first)),
    }
    optimizer.zero_grad(set_to_none=True)
    return out


def sgd_rule_check(optimizer: torch.optim.Optimizer, model: nn.Module, before: dict, grads: dict) -> dict:
    """For plain SGD (no momentum, weight decay, nesterov or maximize): w_new == w - lr * grad, numerically."""
    if type(optimizer) is not torch.optim.SGD:
        return {"applies": False, "why": f"shown for plain SGD only; {type(optimizer).__name__} keeps state"}
    names = param_names_by_id(model)
    worst = 0.0
    for g in optimizer.param_groups:
        if g["momentum"] or g["weight_decay"] or g["nesterov"] or g["maximize"]:
            return {"applies": False, "why": "momentum, weight_decay, nesterov or maximize change the rule"}
        for p in g["params"]:
            n = names[id(p)]
            if grads[n] is None:
                continue
            expected = before[n] - float(g["lr"]) * grads[n]
            worst = max(worst, (p.detach() - expected).abs().max().item())
    return {"applies": True, "max_abs_error": worst, "holds": worst <= 1e-6}


def inspect_params(
    cfg: Config, *, checkpoint: str | None = None, optimizer_spec: str | None = None, step: bool = False
) -> Inspection:
    ckpt = None
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        cfg = validate(ckpt["config"], f"{checkpoint} (its config)")
    if optimizer_spec is not None:
        name, kwargs = parse_spec(optimizer_spec)
        cfg = cfg.model_copy(
            update={
                "optimizer": optimizer_config(
                    canonical_name(resolve_optimizer(name, f"--optimizer {optimizer_spec}")),
                    kwargs,
                    f"--optimizer {optimizer_spec}",
                )
            }
        )
    device = preflight(cfg, trains=False)
    with torch_settings(cfg):
        return _inspect(cfg, device, checkpoint, ckpt, optimizer_spec is not None, step)


def _inspect(
    cfg: Config,
    device: torch.device,
    checkpoint: str | None,
    ckpt: dict | None,
    other_optimizer: bool,
    step: bool,
) -> Inspection:
    source = f"checkpoint {checkpoint}" if checkpoint is not None else "config"
    in_features, out_features = task_shape(cfg.data)
    if not cfg.model.is_user_model:  # refused in one line, as train does, rather than by the allocator
        check_memory(
            cfg, n_train=cfg.data.batch_size, in_features=in_features, out_features=out_features, device=device
        )
    seed_torch(cfg.seed)
    model = build_task_model(cfg, in_features, out_features).to(device)
    optimizer = build_optimizer(model, cfg.optimizer, device, fused=cfg.train.fused)
    notes = []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise UserError(
                f"{checkpoint}: the weights do not fit the model of its config ({str(exc).splitlines()[0]})"
            ) from None
        if not other_optimizer:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as exc:
                raise UserError(f"{checkpoint}: the optimizer state does not fit ({exc})") from None
        else:
            notes.append("--optimizer given: the checkpoint's optimizer state is not loaded")
    params, totals = describe_params(model)
    result = Inspection(
        source,
        type(optimizer).__name__,
        params,
        totals,
        describe_state_dict(model),
        describe_groups(optimizer, model),
        describe_optimizer_state(optimizer, model),
        check_linkage(model, optimizer),
        describe_modes(model),
        notes=notes,
    )
    if step:
        result.step = one_step(cfg, model, optimizer, device)
        result.optimizer_state = describe_optimizer_state(optimizer, model)
    result.optimizer_mode = optimizer_mode(optimizer)
    return result
