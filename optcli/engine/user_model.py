"""A user's model: model.name is an import path pkg.module:factory (a class or a function returning an nn.Module),
called with model.kwargs, as LightningCLI's class_path/init_args. Importing it runs the user's own code.

The factory may take in_features, out_features, input_shape and num_classes by name; optcli passes the ones its
signature names. model.path (made absolute when the config is loaded) is put first on the import path, in every
process that builds the model: worker processes and torchrun ranks import it as this one does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optcli.config import ModelConfig
from optcli.errors import UserError
from optcli.tasks.base import Task
from optcli.tasks.user_code import first_line, import_callable


def import_factory(cfg: ModelConfig) -> Callable[..., Any]:
    """The object model.name names, imported (after putting model.path on sys.path), or one line naming the key."""
    return import_callable(cfg.name, cfg.path, key="model.name", path_key="model.path")


def _offered(factory: Callable[..., Any], task: Task, in_features: int, out_features: int) -> dict[str, Any]:
    """The shapes optcli can tell the factory, for the ones its signature names."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    offered = {
        "in_features": in_features,
        "out_features": out_features,
        "input_shape": task.input_shape,
        "num_classes": task.num_classes,
    }
    return {k: v for k, v in offered.items() if k in params and v is not None}


def build_user_model(cfg: ModelConfig, task: Task, in_features: int, out_features: int) -> nn.Module:
    """The user's model (draws from torch's global RNG: seed it first for repeatable initial weights)."""
    factory = import_factory(cfg)
    kwargs = {**_offered(factory, task, in_features, out_features), **cfg.kwargs}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: any error it raises is a problem of the config's model
        raise UserError(f"model.name: {cfg.name}({', '.join(kwargs)}) raised {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name: {cfg.name} returned a {type(model).__name__}, not a torch.nn.Module")
    if "input_shape" in kwargs and len(task.input_shape) > 1:
        # the data are rows (as the MLP takes them); a model that asked for the image shape gets images
        model.register_forward_pre_hook(functools.partial(_reshape_input, shape=tuple(task.input_shape)))
    return model


def _reshape_input(module: nn.Module, args: tuple[Any, ...], *, shape: tuple[int, ...]) -> tuple[Any, ...]:
    return (args[0].reshape(-1, *shape), *args[1:])


def check_user_model(cfg: ModelConfig, task: Task) -> None:
    """Build the user's model once on the CPU (torch's RNG left as it was) and run a batch of zeros through it:
    its output must have the shape the task's targets want."""
    n_in, n_out = task.shapes()
    x, _ = task.example_batch(2)
    with torch.random.fork_rng(devices=[]):
        model = build_user_model(cfg, task, n_in, n_out)
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as exc:  # the user's forward
            raise UserError(
                f"model.name: {cfg.name} fails on a batch of shape {tuple(x.shape)} ({first_line(exc)})"
            ) from None
    want = (2, n_out)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model.name: {cfg.name} gives outputs of shape {got} for a batch of 2; data.name={task.name} wants "
            f"{want} ({task.kind.value}, out_features={n_out})"
        )
