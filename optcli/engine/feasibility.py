"""Models that cannot train are refused before anything is allocated: BatchNorm handed a last batch of one sample
(its variance is undefined, and torch raises in the middle of an epoch), and a model whose parameters, gradients,
optimizer state and activations cannot fit in the device's memory (estimated from the config, not allocated)."""

from __future__ import annotations

import os

import torch
from torch import nn

from optcli.config import Config
from optcli.engine.loop import EVAL_BATCH  # evaluation runs in batches this large
from optcli.engine.optimizers import check_kwargs, needs_closure, resolve_optimizer
from optcli.errors import UserError

BYTES_PER_VALUE = 4  # float32 parameters, gradients, optimizer state and activations


def check_batch_norm(cfg: Config, n_train: int) -> None:
    if not cfg.model.batch_norm:
        return
    last = n_train % cfg.data.batch_size or cfg.data.batch_size
    if min(last, n_train) == 1:
        raise UserError(
            f"model.batch_norm: the last batch of each epoch holds 1 sample ({n_train} training samples in batches of "
            f"{cfg.data.batch_size}), and BatchNorm cannot train on one; choose another data.batch_size or "
            f"data.samples/data.val_fraction, or set model.batch_norm=false"
        )


def parameter_count(cfg: Config, in_features: int, out_features: int) -> int:
    widths = [in_features, *cfg.model.hidden, out_features]
    linear = sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))
    return linear + (2 * sum(cfg.model.hidden) if cfg.model.batch_norm else 0)


def optimizer_state_per_parameter(cfg: Config) -> int:
    """Values of optimizer state per parameter (SGD 0, momentum 1, Adam 2, ...), measured on a 3x3 probe."""
    cls = resolve_optimizer(cfg.optimizer.name)
    probe = nn.Linear(3, 3, bias=False)
    try:
        optimizer = cls(probe.parameters(), **check_kwargs("optimizer", cls, cfg.optimizer.kwargs))
        loss = lambda: probe(torch.ones(1, 3)).square().sum()  # noqa: E731 (the closure LBFGS wants)
        loss().backward()
        optimizer.step(loss if needs_closure(optimizer) else None)
    except Exception:  # check_optimizer reports what is wrong with the keywords; here, assume Adam's two
        return 2
    shape = probe.weight.shape  # per-parameter buffers; scalars such as Adam's step count are negligible
    return sum(1 for s in optimizer.state.values() for t in s.values() if getattr(t, "shape", None) == shape)


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None  # mps: no reliable figure


def _bytes_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_memory(cfg: Config, *, n_train: int, in_features: int, out_features: int, device: torch.device) -> None:
    params = parameter_count(cfg, in_features, out_features)
    state = optimizer_state_per_parameter(cfg)
    rows = max(cfg.data.batch_size, min(EVAL_BATCH, n_train))
    # per row: the input, and for each hidden layer its Linear, [BatchNorm], activation and [dropout] outputs
    activations = rows * (in_features + 4 * sum(cfg.model.hidden) + out_features)
    need = BYTES_PER_VALUE * (params * (2 + state) + activations)
    have = available_bytes(device)
    if have is not None and need > have:
        raise UserError(
            f"model: needs about {_bytes_text(need)} ({params:,} parameters x (weights + gradients + {state:g} "
            f"optimizer state) + activations, float32), more than the {_bytes_text(have)} available on {device}; "
            f"make model.hidden smaller"
        )


def check_trainable(cfg: Config, *, n_train: int, in_features: int, out_features: int, device: torch.device) -> None:
    check_batch_norm(cfg, n_train)
    if cfg.model.is_user_model:
        return  # its size is known only once it is built (model.hidden describes the MLP alone)
    check_memory(cfg, n_train=n_train, in_features=in_features, out_features=out_features, device=device)
