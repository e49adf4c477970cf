"""Small optimizers reached by import path in the tests (tests.helpers.custom_optim:SignDescent)."""

from __future__ import annotations

import torch


class SignDescent(torch.optim.Optimizer):
    """w <- w - lr * sign(grad): a rule simple enough to check by hand."""

    def __init__(self, params, lr: float = 0.01, scale: float = 1.0, **kwargs):
        super().__init__(params, {"lr": lr, "scale": scale})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"] * group["scale"])
        return None
