"""The synthetic regression tasks."""

from __future__ import annotations

import torch

from optcli.config import DataConfig
from optcli.tasks import Split


def load_regression(cfg: DataConfig) -> Split:
    """The tutorial's task: inputs and targets both N(0, 1), independent of each other."""
    g = torch.Generator().manual_seed(cfg.seed)
    return Split(torch.randn(cfg.samples, cfg.inputs, generator=g), torch.randn(cfg.samples, cfg.outputs, generator=g))
