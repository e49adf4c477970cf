"""The MLP (Linear / [BatchNorm1d] / activation / [Dropout] per hidden layer), its init schemes, and the checks of
a config's model (the MLP's, or a user's: engine/user_model.py) and loss (engine/losses.py)."""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optcli.config import Config, ModelConfig
from optcli.errors import UserError
from optcli.tasks.registry import get_task

ACTIVATION_CLASSES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper random mask on CPU, where drawing the mask dominates its cost.

    F.dropout draws one Bernoulli sample per element (about 11 ns each on these CPUs, a third of an MNIST epoch).
    Here one 64-bit random integer gives four 16-bit chunks; the low 15 bits of each are uniform, so an element is
    dropped with probability round(p * 2**15) / 2**15 (within 2**-16 of p) and kept ones are scaled by the inverse
    of the exact keep probability, keeping the output unbiased. Other devices use F.dropout, which is fused there.
    It is an nn.Dropout: train()/eval() and everything that looks for Dropout modules treat it as one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_mask(x, self.p)


def dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dropout's scaled keep mask for `x` on CPU, drawn from `generator` (torch's global one by default): one
    draw of x.numel() // 4 + 1 random int64s, so a run's masks are a function of its generator's seed alone."""
    threshold = round(p * 32768)
    bits = torch.empty(x.numel() // 4 + 1, dtype=torch.int64).random_(generator=generator)
    chunks = bits.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF
    return (chunks >= threshold).to(x.dtype).mul_(32768 / (32768 - threshold))


class MLP(nn.Sequential):
    """Named layers so parameter names read well: fc1.weight, bn1.running_mean, out.bias."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        out_features: int,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            if batch_norm:
                layers[f"bn{i}"] = nn.BatchNorm1d(h)
            layers[f"act{i}"] = ACTIVATION_CLASSES[activation]()
            if dropout > 0:
                layers[f"drop{i}"] = Dropout(dropout)
            width = h
        layers["out"] = nn.Linear(width, out_features)
        super().__init__(layers)


def init_schemes() -> dict[str, Callable[..., Any]]:
    """torch.nn.init functions that can fill a weight matrix with nothing but the tensor: xavier_uniform, ..."""
    schemes = {}
    for name, fn in vars(nn.init).items():
        if name.startswith("_") or not name.endswith("_") or not callable(fn):
            continue
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            continue
        if (
            params
            and params[0].name == "tensor"
            and all(
                p.default is not inspect.Parameter.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                for p in params[1:]
            )
        ):
            schemes[name.rstrip("_")] = fn
    return schemes


def check_init(cfg: ModelConfig) -> None:
    if cfg.init != "default" and cfg.init not in init_schemes():
        raise UserError(
            f"model.init: unknown scheme '{cfg.init}' (valid: default, {', '.join(sorted(init_schemes()))})"
        )


def check_model_config(cfg: Config) -> None:
    """The model and the loss of a config, checked before any data is loaded or file written: the init scheme, a
    user's model (imported, built once, its output shape against the task's), the loss and its keywords."""
    from optcli.engine.losses import build_loss, check_loss, loss_name
    from optcli.engine.user_model import check_user_model

    check_init(cfg.model)
    task = get_task(cfg.data)
    if cfg.model.is_user_model:
        check_user_model(cfg.model, task)
    check_loss(cfg)
    if task.default_model(cfg.seed) is not None:
        return  # the task's own model and loss go together
    x, y = task.example_batch(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns, and goes on, when a loss broadcasts mismatched shapes
            build_loss(cfg, cfg.train.reduction)(torch.zeros(2, task.shapes()[1]), y)
    except (RuntimeError, ValueError, TypeError, Warning) as exc:
        raise UserError(
            f"train.loss: {loss_name(cfg)} cannot take this task's outputs and targets "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None


def apply_init_and_freeze(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """model.init on every Linear and convolution (weights by the scheme, biases zero), then model.freeze."""
    if cfg.init != "default":
        fill = init_schemes()[cfg.init]
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                fill(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    names = [n for n, _ in model.named_parameters()]
    for pattern in cfg.freeze:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise UserError(f"model.freeze: '{pattern}' matches no parameter (names: {', '.join(names)})")
        for name in matched:
            model.get_parameter(name).requires_grad_(False)
    return model


def build_model(cfg: ModelConfig, in_features: int, out_features: int) -> MLP:
    """The MLP with its init applied and frozen parameters marked. Draws from torch's global RNG:
    seed it first for repeatable initial weights."""
    check_init(cfg)
    model = MLP(in_features, cfg.hidden, out_features, cfg.activation, cfg.dropout, cfg.batch_norm)
    apply_init_and_freeze(model, cfg)
    return model


def resolve_device(name: str) -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device: '{name}' asked for, but CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device: '{name}' asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device: '{name}' asked for, but MPS is not available on this machine (use cpu or auto)")
    return device
