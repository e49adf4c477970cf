"""The checks every command makes before it loads data or writes a file (train, compare, lr-find, inspect-params):
one function, so that a config is refused the same way whichever command reads it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from optcli.config import Config
from optcli.engine.distributed import SINGLE, Dist
from optcli.engine.loop import check_closure_settings, check_precision
from optcli.engine.model import check_model_config, resolve_device
from optcli.engine.optimizers import check_optimizer, check_scheduler, needs_closure, resolve_optimizer
from optcli.errors import UserError
from optcli.rundir.loggers import check_loggers


def preflight(
    cfg: Config,
    *,
    optimizers: Mapping[str, type] | None = None,
    dist: Dist = SINGLE,
    trains: bool = True,
) -> torch.device:
    """Every check that needs torch; returns the device. The model config, and the optimizer: the config's own, or
    `optimizers` (where each comes from -> its class: a comparison's specs, which parse_specs has checked). For a
    command that trains (`trains`, not lr-find or inspect-params, which set the lr themselves and write no run):
    the closure settings, the scheduler, the loggers, a torchrun job's shape and the precision on the device."""
    check_model_config(cfg)
    if optimizers is None:
        check_optimizer(cfg.optimizer)
        optimizers = {"optimizer": resolve_optimizer(cfg.optimizer.name)}
    if not trains:
        return resolve_device(cfg.device)
    for where, cls in optimizers.items():
        check_closure_settings(cls, cfg.train.accumulate, where)
    check_scheduler(cfg.scheduler, cfg.train.epochs)
    check_loggers(cfg)
    if dist.enabled:
        check_distributed(cfg, dist)
    device = resolve_device(cfg.device)
    uses_closure = any(needs_closure(cls) for cls in optimizers.values())
    check_precision(cfg.train.precision, device, uses_closure=uses_closure)
    return device


def check_distributed(cfg: Config, dist: Dist) -> None:
    """A torchrun job splits every batch evenly over its ranks, and cannot step a closure optimizer in step."""
    if cfg.data.batch_size % dist.world:
        raise UserError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by the torchrun world size "
            f"{dist.world}; each rank takes an equal shard of every batch"
        )
    if needs_closure(resolve_optimizer(cfg.optimizer.name)):
        raise UserError(
            f"optimizer: {cfg.optimizer.name} re-evaluates the loss in step() and is not supported "
            f"under torchrun; run it in one process"
        )
