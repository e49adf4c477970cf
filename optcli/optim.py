"""Optimizers and schedulers looked up in torch by name, their keyword arguments checked against signatures.

torch.optim is the registry: nothing here lists optimizers by hand.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable
from typing import Any, cast

import torch
import yaml
from torch import nn

from optcli.config import OptimizerConfig, SchedulerConfig, parse_yaml
from optcli.errors import UserError

EPOCH_LENGTH_KWARGS = ("T_max", "total_steps")  # filled with train.epochs when not given (stepped per epoch)


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }


def scheduler_classes() -> dict[str, type]:
    sched = torch.optim.lr_scheduler
    bases = (sched.LRScheduler, sched.ReduceLROnPlateau)
    return {
        name.lower(): cls
        for name, cls in vars(sched).items()
        if isinstance(cls, type)
        and issubclass(cls, bases)
        and not name.startswith("_")
        and cls is not sched.LRScheduler
    }


def _lookup(kind: str, name: str, classes: dict[str, type]) -> type:
    cls = classes.get(name.lower())
    if cls is None:
        valid = ", ".join(c.__name__ for c in classes.values())
        raise UserError(f"{kind}: unknown name '{name}' (valid: {valid})")
    return cls


def resolve_optimizer(name: str) -> type[torch.optim.Optimizer]:
    return _lookup("optimizer.name", name, optimizer_classes())


def signature_defaults(cls: type, skip: tuple[str, ...] = ("self", "params", "optimizer")) -> dict[str, Any]:
    """Keyword arguments of a constructor with their defaults (inspect.Parameter.empty where required)."""
    return {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_kwargs(where: str, cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Unknown keywords are errors that list the valid ones; lists become tuples where torch expects tuples."""
    defaults = signature_defaults(cls)
    unknown = [k for k in kwargs if k not in defaults]
    if unknown:
        raise UserError(f"{where}: {cls.__name__} takes no argument '{unknown[0]}' (valid: {', '.join(defaults)})")
    return {k: tuple(v) if isinstance(v, list) and isinstance(defaults[k], tuple) else v for k, v in kwargs.items()}


def needs_closure(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer]) -> bool:
    """LBFGS-style optimizers re-evaluate the loss and must get a closure in step()."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def step_with_closure(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """optimizer.step(closure) for the optimizers that re-evaluate the loss. torch types the closure as returning a
    float, but step() hands back whatever the closure returned: here the loss tensor."""
    return cast(torch.Tensor, optimizer.step(cast(Callable[[], float], closure)))


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'sgd:lr=0.1,momentum=0.9,nesterov=true' -> ('sgd', {...}); values parsed as YAML ('betas=[0.9,0.99]')."""
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise UserError(f"optimizer spec '{spec}': missing the optimizer name")
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(rest) if rest.strip() else []:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
            raise UserError(f"optimizer spec '{spec}': expected key=value, got '{item}'")
        try:
            kwargs[key.strip()] = parse_yaml(text)
        except yaml.YAMLError:
            raise UserError(f"optimizer spec '{spec}': cannot parse the value of '{key.strip()}': '{text}'") from None
    return name.strip(), kwargs


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _use_fused(cls: type, kwargs: dict[str, Any], device: torch.device) -> bool:
    sig = signature_defaults(cls)
    return "fused" in sig and "fused" not in kwargs and "foreach" not in kwargs and device.type in ("cpu", "cuda")


def check_optimizer(cfg: OptimizerConfig) -> None:
    """Everything about the optimizer that can be wrong, found before any data is loaded: the name, the
    keywords, their values, and whether it can train dense parameters at all (SparseAdam cannot)."""
    cls = resolve_optimizer(cfg.name)
    kwargs = check_kwargs("optimizer", cls, cfg.kwargs)
    for i, group in enumerate(cfg.groups):
        check_kwargs(f"optimizer.groups.{i}", cls, group.model_extra or {})
    probe = nn.Sequential(nn.Linear(2, 2))  # a weight matrix and a bias, like the MLP's layers
    try:
        optimizer = cls(probe.parameters(), **kwargs)
        loss_fn = lambda: probe(torch.ones(1, 2)).square().sum()  # noqa: E731
        loss_fn().backward()
        optimizer.step((lambda: loss_fn()) if needs_closure(optimizer) else None)
    except Exception as exc:  # whatever torch makes of the user's keyword values is a user error here
        raise UserError(f"optimizer: {cls.__name__}({_fmt(kwargs)}) cannot train this model: {exc}") from None


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device: torch.device, fused: bool = True
) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters; `groups` entries claim parameters by glob, in order,
    with their own overrides; the rest form the first group with the top-level settings."""
    cls = resolve_optimizer(cfg.name)
    kwargs = check_kwargs("optimizer", cls, cfg.kwargs)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    claimed: set[str] = set()
    groups = []
    for i, group in enumerate(cfg.groups):
        names = [n for n, _ in trainable if n not in claimed and any(fnmatch.fnmatch(n, g) for g in group.params)]
        if not names:
            raise UserError(f"optimizer.groups.{i}.params: {group.params} match no trainable parameter")
        claimed.update(names)
        overrides = check_kwargs(f"optimizer.groups.{i}", cls, group.model_extra or {})
        groups.append({"params": [p for n, p in trainable if n in names], "param_names": names, **overrides})
    rest = [(n, p) for n, p in trainable if n not in claimed]
    if rest:
        groups.insert(0, {"params": [p for _, p in rest], "param_names": [n for n, _ in rest]})
    if not groups:
        raise UserError("model.freeze: every parameter is frozen; there is nothing to optimize")
    if fused and _use_fused(cls, kwargs, device):
        try:
            return cls(groups, **{**kwargs, "fused": True})
        except (RuntimeError, ValueError):
            pass  # a combination the fused kernel does not support (e.g. differentiable): fall back
    try:
        return cls(groups, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"optimizer: {cls.__name__}({_fmt(kwargs)}): {exc}") from None


def check_scheduler(cfg: SchedulerConfig | None, epochs: int) -> None:
    """The scheduler's name and keywords, checked on a stand-in optimizer before any data is loaded."""
    if cfg is not None:
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), cfg, epochs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig | None, epochs: int):
    if cfg is None:
        return None
    cls = _lookup("scheduler.name", cfg.name, scheduler_classes())
    kwargs = check_kwargs("scheduler", cls, cfg.kwargs)
    defaults = signature_defaults(cls)
    for key in EPOCH_LENGTH_KWARGS:
        if key in defaults and key not in kwargs and defaults[key] in (inspect.Parameter.empty, None):
            kwargs[key] = epochs
    missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise UserError(f"scheduler: {cls.__name__} needs {', '.join(missing)} (e.g. scheduler.{missing[0]}: ...)")
    try:
        return cls(optimizer, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"scheduler: {cls.__name__}({_fmt(kwargs)}): {exc}") from None


def is_plateau(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def list_optimizers() -> list[dict[str, Any]]:
    """Every torch.optim optimizer with its default hyperparameters, read from its signature."""
    rows = []
    for key, cls in sorted(optimizer_classes().items()):
        defaults = {k: ("required" if v is inspect.Parameter.empty else v) for k, v in signature_defaults(cls).items()}
        rows.append({"name": cls.__name__, "key": key, "defaults": defaults})
    return rows


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
