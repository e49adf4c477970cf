"""Optimizers and schedulers looked up by name, their keyword arguments checked against signatures.

An optimizer name is resolved in this order: torch.optim (case-insensitive), then pytorch-optimizer's registry
when it is installed, then an import path (`pkg.module:Class` or `pkg.module.Class`). Nothing here lists
optimizers by hand. The modes (train/eval of schedule-free optimizers) and closure rules live in stepping.py.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import yaml
from torch import nn

from optcli.config import OptimizerConfig, SchedulerConfig, optimizer_config, parse_yaml
from optcli.engine import stepping
from optcli.errors import UserError

# Keywords that give a schedule's length: filled, when not given, with the number of times the scheduler will
# be stepped (train.epochs per epoch, epochs x optimizer steps per epoch per step)
SCHEDULE_LENGTH_KWARGS = ("T_max", "total_steps", "total_iters")
# A scheduler whose signature counts in steps (OneCycleLR's steps_per_epoch, CyclicLR's step_size_up, warmup
# steps) is stepped after every optimizer step unless scheduler.interval says otherwise; the rest per epoch.
PER_STEP_KWARGS = ("steps_per_epoch", "step_size_up", "warmup_steps", "num_warmup_steps", "warmup_iters")


@dataclass
class OptimizerSpec:
    label: str
    name: str  # the optimizer's class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)  # optimizer.groups of the config, for every spec

    def config(self) -> OptimizerConfig:
        return optimizer_config(self.name, {**self.kwargs, "groups": self.groups}, f"optimizer spec '{self.label}'")


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
        raise UserError(f"{kind}: unknown name '{name}'{_did_you_mean(name, list(classes))} (valid: {valid})")
    return cls


def _did_you_mean(name: str, candidates: list[str]) -> str:
    hint = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def zoo_installed() -> bool:
    return importlib.util.find_spec("pytorch_optimizer") is not None


def registry_classes() -> dict[str, type]:
    """pytorch-optimizer's registry (name -> class), empty when it is not installed. Imported only when a name is
    not in torch.optim: importing it costs about two seconds."""
    if not zoo_installed():
        return {}
    import pytorch_optimizer

    classes = {}
    for name in pytorch_optimizer.get_supported_optimizers():
        try:
            classes[name] = pytorch_optimizer.load_optimizer(name)
        except (ImportError, NotImplementedError):  # integrations that need CUDA or other packages
            continue
    return classes


def resolve_optimizer(name: str, where: str = "optimizer.name") -> type[torch.optim.Optimizer]:
    """torch.optim first, then pytorch-optimizer's registry, then an import path."""
    key = name.strip().lower()
    torch_classes = optimizer_classes()
    if key in torch_classes:
        return torch_classes[key]
    if ":" in name or "." in name:
        return _import_optimizer(name.strip(), where)
    registry = registry_classes()
    if key in registry:
        return cast(type[torch.optim.Optimizer], registry[key])
    known = list(torch_classes) + list(registry)
    zoo = (
        f"; {len(registry)} from pytorch-optimizer, see optcli optimizers"
        if registry
        else "; more with optcli[zoo]: pip install 'optcli[zoo]'"
    )
    valid = ", ".join(c.__name__ for c in torch_classes.values())
    raise UserError(
        f"{where}: unknown name '{name}'{_did_you_mean(name, known)} (valid: {valid}{zoo}; "
        f"or an import path pkg.module:Class)"
    )


def _import_optimizer(path: str, where: str) -> type[torch.optim.Optimizer]:
    """`pkg.module:Class` or `pkg.module.Class`: any installed package, or a module on the path."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"{where}: '{path}' is not an import path (expected pkg.module:Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{where}: cannot import '{module_name}' for '{path}' ({exc})") from None
    cls: Any = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            names = [n for n in dir(module) if not n.startswith("_")]
            raise UserError(f"{where}: {module_name} has no '{attr}'{_did_you_mean(attr, names)}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"{where}: '{path}' is not a torch.optim.Optimizer subclass")
    return cls


def canonical_name(cls: type) -> str:
    """The name that resolves back to `cls` in any process: its class name when the lookup order finds it by
    that name (torch.optim, the registry), otherwise its import path."""
    try:
        if resolve_optimizer(cls.__name__) is cls:
            return cls.__name__
    except UserError:
        pass
    return f"{cls.__module__}:{cls.__qualname__}"


def optimizer_source(cls: type) -> str:
    if cls.__module__.startswith("torch.optim"):
        return "torch.optim"
    if cls.__module__.startswith("pytorch_optimizer"):
        return "pytorch-optimizer"
    return cls.__module__.split(".")[0]


def signature_defaults(cls: type, skip: tuple[str, ...] = ("self", "params", "optimizer")) -> dict[str, Any]:
    """Keyword arguments of a constructor with their defaults (inspect.Parameter.empty where required)."""
    return {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_kwargs(where: str, cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Unknown keywords are errors that list the valid ones; lists become tuples where torch expects tuples.

    Only named parameters count: a `**kwargs` in a signature is no pass-through for typos. The one exception
    is a wrapper that takes a `base_optimizer` class (SAM and its kin): its extra keywords are checked against
    the base optimizer's signature, and the base optimizer is named like any other (`base_optimizer=adamw`)."""
    defaults = signature_defaults(cls)
    base = kwargs.get("base_optimizer") if "base_optimizer" in defaults else None
    if isinstance(base, str):
        base = resolve_optimizer(base, f"{where}.base_optimizer")
    allowed = {**(signature_defaults(base) if isinstance(base, type) else {}), **defaults}
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(allowed), n=1)
        valid = f"did you mean '{hint[0]}'? valid: " if hint else "valid: "
        raise UserError(
            f"{where}: {cls.__name__} takes no argument '{unknown[0]}' ({valid}{', '.join(allowed) or 'none'})"
        )
    for key, value in kwargs.items():
        check_value_type(where, cls, key, value, allowed[key])
    return {k: tuple(v) if isinstance(v, list) and isinstance(allowed[k], tuple) else v for k, v in kwargs.items()}


def _constructor_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords as the constructor takes them: a `base_optimizer` named by string becomes its class."""
    if isinstance(kwargs.get("base_optimizer"), str) and "base_optimizer" in signature_defaults(cls):
        return {**kwargs, "base_optimizer": resolve_optimizer(kwargs["base_optimizer"], "optimizer.base_optimizer")}
    return kwargs


def check_value_type(where: str, cls: type, key: str, value: Any, default: Any) -> None:
    """A keyword whose default is a bool or a number must get one of the same kind, found here with the key's
    name rather than deep inside torch. Defaults of other types (None, tensors, strings) are left to torch."""
    got = f"got {value!r} ({type(value).__name__})"
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):  # torch writes float defaults as 0 too (SGD's momentum)
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, tuple) and default and all(isinstance(v, (int, float)) for v in default):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default)
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        expected = f"a list of {len(default)} numbers"
    else:
        return
    if not ok:
        at = f"{where}: {key}" if where.startswith("optimizer spec") else f"{where}.{key}"
        raise UserError(f"{at}: {cls.__name__} expects {expected} like its default {default!r}, {got}")


def needs_closure(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer]) -> bool:
    """Optimizers whose step() cannot run without a closure (the rule: see stepping.py)."""
    return stepping.needs_closure(optimizer)


def step_with_closure(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """optimizer.step(closure), with the gradient computed first for SAM-style optimizers (stepping.py)."""
    return stepping.step_with_closure(optimizer, closure)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'sgd:lr=0.1,momentum=0.9,nesterov=true' -> ('sgd', {...}); values parsed as YAML ('betas=[0.9,0.99]').
    An import path keeps its colon, as in optimizer.name: 'pkg.module:Class:lr=0.1' -> ('pkg.module:Class',
    {'lr': 0.1}), and 'mymodule:Class' (a top-level module) alike; only a torch.optim name before the colon
    ('adam:amsgrad') is read as a name and its keywords, so a keyword missing its '=' is named as such."""
    path = re.match(r"\s*(([A-Za-z_][\w.]*):[A-Za-z_][\w.]*)\s*(?::|$)", spec)
    if path and ("." in path.group(2) or path.group(2).lower() not in optimizer_classes()):
        name, rest = path.group(1), spec[path.end() :]
    else:
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
    trial_step(cls, kwargs)


def trial_step(cls: type, kwargs: dict[str, Any]) -> None:
    """The trial step: can this optimizer, with these keywords, train a dense layer at all (SparseAdam cannot)?
    One step on a weight matrix and a bias (like the MLP's layers), driven as training drives it (stepping.py);
    its own RNG draws do not disturb the run's."""
    with torch.random.fork_rng(devices=[]):
        try:
            _probe_step(cls, kwargs)
        except Exception as exc:  # whatever the optimizer makes of the user's keyword values is a user error here
            raise UserError(
                f"optimizer: {cls.__name__}({_kwargs_text(kwargs)}) cannot train this model: {exc}"
            ) from None


def _probe_step(cls: type, kwargs: dict[str, Any]) -> None:
    probe = nn.Sequential(nn.Linear(2, 2))
    optimizer = cls(probe.parameters(), **_constructor_kwargs(cls, kwargs))
    stepping.set_mode(optimizer, training=True)

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        loss = probe(torch.ones(1, 2)).square().sum()
        loss.backward()
        return loss

    if stepping.needs_closure(cls):
        stepping.step_with_closure(optimizer, loss_fn)
    else:
        loss_fn()
        optimizer.step()
    stepping.set_mode(optimizer, training=False)


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device: torch.device, fused: bool = True
) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters; `groups` entries claim parameters by glob, in order,
    with their own overrides; the rest form the first group with the top-level settings."""
    cls = resolve_optimizer(cfg.name)
    kwargs = check_kwargs("optimizer", cls, cfg.kwargs)
    kwargs = _constructor_kwargs(cls, kwargs)
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
        raise UserError(f"optimizer: {cls.__name__}({_kwargs_text(kwargs)}): {exc}") from None


def check_scheduler(cfg: SchedulerConfig | None, epochs: int) -> None:
    """The scheduler's name and keywords, checked on a stand-in optimizer before any data is loaded."""
    if cfg is not None:
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), cfg, epochs)


def scheduler_interval(cfg: SchedulerConfig | None) -> str:
    """ "step" or "epoch": scheduler.interval when given, else per step for schedules counted in steps."""
    if cfg is None:
        return "epoch"
    if cfg.interval is not None:
        return cfg.interval
    cls = _lookup("scheduler.name", cfg.name, scheduler_classes())
    return "step" if any(k in signature_defaults(cls) for k in PER_STEP_KWARGS) else "epoch"


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig | None, epochs: int, steps_per_epoch: int = 1
):
    """The scheduler, with its length (T_max, total_steps, ...) filled in when not given: the number of times
    it will be stepped, epochs at interval "epoch", epochs x optimizer steps per epoch at interval "step"."""
    if cfg is None:
        return None
    cls = _lookup("scheduler.name", cfg.name, scheduler_classes())
    kwargs = check_kwargs("scheduler", cls, cfg.kwargs)
    defaults = signature_defaults(cls)
    interval = scheduler_interval(cfg)
    if interval == "step" and is_plateau_class(cls):
        raise UserError(f"scheduler.interval: {cls.__name__} steps on a validation metric, once per epoch")
    length = epochs * steps_per_epoch if interval == "step" else epochs
    length_given = any(k in kwargs for k in (*SCHEDULE_LENGTH_KWARGS, "epochs", "steps_per_epoch"))
    for key in SCHEDULE_LENGTH_KWARGS:
        if key in defaults and not length_given and defaults[key] in (inspect.Parameter.empty, None):
            kwargs[key] = length
    missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise UserError(f"scheduler: {cls.__name__} needs {', '.join(missing)} (e.g. scheduler.{missing[0]}: ...)")
    try:
        return cls(optimizer, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"scheduler: {cls.__name__}({_kwargs_text(kwargs)}): {exc}") from None


def is_plateau(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def is_plateau_class(cls: type) -> bool:
    return issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def list_optimizers() -> list[dict[str, Any]]:
    """Every optimizer that can be named, with its source and its default hyperparameters read from its
    signature: torch.optim's, then pytorch-optimizer's registry (when installed) where torch does not shadow it."""
    rows = []
    torch_classes = optimizer_classes()
    registry = {k: c for k, c in registry_classes().items() if k not in torch_classes}
    for source, classes in (("torch.optim", torch_classes), ("pytorch-optimizer", registry)):
        for key, cls in sorted(classes.items()):
            try:
                defaults = {
                    k: ("required" if v is inspect.Parameter.empty else v) for k, v in signature_defaults(cls).items()
                }
            except (TypeError, ValueError):  # a signature inspect cannot read
                defaults = {}
            modes = "train/eval" if stepping.has_modes(cls) else None
            rows.append({"name": cls.__name__, "key": key, "source": source, "modes": modes, "defaults": defaults})
    return rows


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
