"""A user's model for optcli: a residual MLP (pre-norm blocks x + Linear(GELU(Linear(LayerNorm(x))))).

optcli imports it by model.name (resmlp:ResidualMLP), with model.path: . so that this folder is on the import
path, and calls it with the task's in_features and out_features (the names its signature asks for) and
model.kwargs. Any class or function returning a torch.nn.Module works the same way."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, expansion * width)
        self.down = nn.Linear(expansion * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, width: int = 64, blocks: int = 2, expansion: int = 2):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(Block(width, expansion) for _ in range(blocks)))
        self.out = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))
