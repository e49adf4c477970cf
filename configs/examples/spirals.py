"""A user's own map-style Dataset for optcli: three interleaved spirals in the plane, one class each.

data.name: spirals:make_dataset in spirals.yaml names make_dataset below; optcli calls it with data.kwargs and
reads (input, target) pairs from what it returns: here a training and a test Dataset."""

import math

import torch
from torch.utils.data import Dataset


class Spirals(Dataset):
    """`n` points on `arms` spiral arms (class = arm), with Gaussian noise of std `noise`."""

    def __init__(self, n: int, arms: int, noise: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(arms, (n,), generator=g)
        radius = torch.rand(n, generator=g)
        angle = 4.0 * radius + self.labels * (2 * math.pi / arms)
        points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        self.points = points + noise * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.points[i], int(self.labels[i])


def make_dataset(n_train: int = 2000, n_test: int = 500, arms: int = 3, noise: float = 0.05):
    return Spirals(n_train, arms, noise, seed=0), Spirals(n_test, arms, noise, seed=1)
