"""What every run builds the same way: torch's seed, the process-wide torch settings, and the model, optimizer
and scheduler of a config. Shared by single runs, comparison trials and inspect-params."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from optcli.config import Config
from optcli.engine.feasibility import check_trainable
from optcli.engine.model import apply_init_and_freeze, build_model
from optcli.engine.optimizers import build_optimizer, build_scheduler, needs_closure
from optcli.tasks import Data, steps_per_epoch
from optcli.tasks.registry import get_task


def seed_torch(seed: int) -> None:
    """The one place optcli seeds torch's global generator (CPU and every CUDA device): initial weights and
    dropout masks. The data and batch order have generators of their own (optcli.tasks)."""
    torch.manual_seed(seed)


def set_torch_settings(cfg: Config, *, threads: int | None = None) -> None:
    """The process-wide torch settings a run depends on: subnormal flushing and, when given, the thread count
    (which decides how torch splits parallel sums, and so the last bits of the results). The one place optcli
    sets them; a process that runs nothing else (a comparison's worker) sets them once, others use torch_settings.

    Flushing applies to the calling thread and to the threads it creates later: set first thing in a process, it
    reaches torch's whole thread pool (the CLI does no parallel work before a run starts)."""
    torch.set_flush_denormal(cfg.train.flush_denormal)  # Adam's exp_avg decays into subnormals, slow on x86
    if threads is not None:
        torch.set_num_threads(threads)


@contextmanager
def torch_settings(cfg: Config, *, threads: int | None = None) -> Iterator[None]:
    """set_torch_settings for the run, put back after it, since library callers, tests and a Ray worker's next
    task share the process."""
    previous_threads = torch.get_num_threads()
    set_torch_settings(cfg, threads=threads)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default; there is no getter to save the state before
        torch.set_num_threads(previous_threads)


def build_task_model(cfg: Config, in_features: int, out_features: int) -> nn.Module:
    """The task's own model when it has one (a 2-D function's point, started where the seed says), else the
    config's: the MLP or a user's factory (model.name), with model.init and model.freeze applied."""
    task = get_task(cfg.data)
    own = task.default_model(cfg.seed)
    if own is not None:
        return own
    if cfg.model.is_user_model:
        from optcli.engine.user_model import build_user_model

        return apply_init_and_freeze(build_user_model(cfg.model, task, in_features, out_features), cfg.model)
    return build_model(cfg.model, in_features, out_features)


def build_model_and_optimizer(cfg: Config, data: Data, device: torch.device):
    """The model (initial weights a function of cfg.seed alone), its optimizer and scheduler."""
    n_train, n_in, n_out = len(data.train), data.in_features, data.out_features
    check_trainable(cfg, n_train=n_train, in_features=n_in, out_features=n_out, device=device)  # before allocating
    seed_torch(cfg.seed)  # the same seed gives the same initial weights whatever the optimizer
    model = build_task_model(cfg, data.in_features, data.out_features).to(device)
    optimizer = build_optimizer(model, cfg.optimizer, device, fused=cfg.train.fused)
    accumulate = 1 if needs_closure(optimizer) else cfg.train.accumulate  # closure optimizers step every batch
    steps = steps_per_epoch(len(data.train), cfg.data.batch_size, accumulate)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.train.epochs, steps)
    return model, optimizer, scheduler
