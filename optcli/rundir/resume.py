"""Resuming a run from its last.pt: what may change on --resume (RESUMABLE_KEYS), the checkpoint's state put back
into a freshly built model, optimizer, scheduler and scaler, and the config a run was started with."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from optcli.config import Config, load_config
from optcli.engine.loop import History
from optcli.engine.optimizers import SCHEDULE_LENGTH_KWARGS, scheduler_classes, signature_defaults
from optcli.errors import UserError

# what may change on --resume without changing what the saved state means: where the files go, how the run is
# displayed or compiled, and train.epochs (more of them, unless a scheduler's length was sized from it)
RESUMABLE_KEYS = ("name", "out_dir", "device", "train.epochs", "train.log_every", "train.compile")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _schedule_sized_from_epochs(cfg: Config) -> bool:
    if cfg.scheduler is None:
        return False
    cls = scheduler_classes().get(cfg.scheduler.name.lower())
    if cls is None:
        return False
    defaults = signature_defaults(cls)
    return any(
        k in defaults and k not in cfg.scheduler.kwargs and defaults[k] in (inspect.Parameter.empty, None)
        for k in SCHEDULE_LENGTH_KWARGS
    )


def check_resume(checkpoint: dict, cfg: Config, run_dir: str) -> None:
    """A resumed run goes on with the config it was saved with: only RESUMABLE_KEYS may differ (a config.yaml
    edited on disk counts), and train.epochs only upwards and only when no schedule was sized from it."""
    missing = object()
    old, new = _flatten(checkpoint["config"]), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    done = len(checkpoint["history"]["epochs"])
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    why = ""
    if "train.epochs" in changed and _schedule_sized_from_epochs(cfg):
        refused.append("train.epochs")
        why = f"; scheduler {cfg.scheduler.name if cfg.scheduler else ''} was sized from train.epochs"
    if refused:
        parts = "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(refused))
        raise UserError(
            f"--resume {run_dir}: would change what the saved state means ({parts}){why}; only "
            f"{', '.join(RESUMABLE_KEYS)} may change on resume: start a new run instead"
        )
    if cfg.train.epochs < done:
        raise UserError(
            f"--resume {run_dir}: train.epochs: {cfg.train.epochs} is fewer than the {done} epochs already trained"
        )


def restore(checkpoint: dict, model, optimizer, scheduler, scaler: torch.amp.GradScaler, resume: str) -> History:
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        history = History.from_dict(checkpoint["history"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(
            f"{resume}: the checkpoint does not fit this config ({str(exc).splitlines()[0][:200]})"
        ) from None
    history.status = "running"
    return history


def resume_config(run_dir: str, overrides: list[str]) -> Config:
    """The config a run was started with (its config.yaml), with --set overrides such as train.epochs=30."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UserError(f"--resume {run_dir}: no such run directory")
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml in it; not a run directory")
    return load_config(path, overrides)
