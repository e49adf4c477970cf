"""The seeds of one optimizer as one model for any nn.Module, a user's own included, through torch.func.

Each seed's model is built exactly as a plain trial builds it (torch seeded, then the task's model, init and freeze),
their parameters and buffers are stacked (`torch.func.stack_module_state`: a leading seed dimension) and the
forward pass is `torch.vmap` over `torch.func.functional_call` of one of the models, so every seed runs its own
weights on its own batch. The stacked tensors are registered under the model's own names (body.0.weight, ...):
optimizer param groups, model.freeze and the dynamics read them as they read a plain model.

Randomness cannot be stacked exactly: under vmap a dropout mask is drawn for all seeds at once (randomness
"different" or "same"), not from each seed's own stream as the plain trial draws it. So the forward runs with
randomness="error", and a model that draws random numbers in training (dropout) or keeps batch statistics in place
(batch norm's running mean) is refused in one line by `vmap_refusal`: its seeds run the plain path. The built-in
MLP keeps engine/stacked.py's baddbmm layers, which draw each seed's own dropout masks and measured faster.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from optcli.config import Config
from optcli.tasks.registry import get_task
from optcli.tasks.user_code import first_line


class FunctionalStack(nn.Module):
    """`models` (same architecture) as one module: x (seeds, batch, ...) -> (seeds, batch, ...)."""

    skeleton: nn.Module

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        params, buffers = stack_module_state(models)
        holder = copy.deepcopy(models[0])  # its tensors are swapped for the stacked ones below
        stacked: dict[int, torch.Tensor] = {}
        for name, p in models[0].named_parameters():
            stacked[id(p)] = nn.Parameter(params[name].detach(), requires_grad=p.requires_grad)
        for name, b in models[0].named_buffers():
            stacked[id(b)] = buffers[name]
        _swap(holder, models[0], stacked)
        # the holder's children and own tensors become this module's, so the names are the model's own
        self._modules.update(holder._modules)
        self._parameters.update(holder._parameters)
        self._buffers.update(holder._buffers)
        # the module functional_call runs (its own tensors unused): not a child, so not in parameters()
        object.__setattr__(self, "skeleton", models[0])
        self.names = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]

    def train(self, mode: bool = True) -> FunctionalStack:
        super().train(mode)
        self.skeleton.train(mode)  # the modules that run, for dropout-like layers and any `self.training` test
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return torch.vmap(self._one, randomness="error")(state, x)

    def _one(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, state, (x,))

    def keep(self, index: torch.Tensor) -> None:
        """Only the seeds at `index` go on (engine.stacked.retire removes their optimizer state)."""

        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data[index]
            for module in self.modules():
                for key, b in module._buffers.items():
                    if b is not None:
                        module._buffers[key] = b[index]


def _swap(holder: nn.Module, original: nn.Module, stacked: dict[int, torch.Tensor]) -> None:
    """Every tensor of `holder` (a deep copy of `original`) replaced by the stacked one, tied ones alike."""
    old = dict(original.named_parameters(remove_duplicate=False))
    old_buffers = dict(original.named_buffers(remove_duplicate=False))
    for name, _ in list(holder.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        holder.get_submodule(owner)._parameters[attr] = stacked[id(old[name])]  # type: ignore[assignment]
    for name, _ in list(holder.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        holder.get_submodule(owner)._buffers[attr] = stacked[id(old_buffers[name])]


def vmap_refusal(cfg: Config) -> str | None:
    """Why a user's model cannot be stacked through torch.func with the plain path's results (one line), or None.
    Builds the model twice on the CPU (torch's RNG left as it was) and runs a training-mode forward of the pair
    under vmap with randomness="error" and a backward through it."""
    from optcli.engine.build import build_task_model

    task = get_task(cfg.data)
    n_in, n_out = task.shapes()
    x, _ = task.example_batch(2)
    with torch.random.fork_rng(devices=[]):
        models = [build_task_model(cfg, n_in, n_out) for _ in range(2)]
    name = f"model.name {cfg.model.name}"
    norms = [n for n, m in models[0].named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if norms:
        return f"{name} has batch norm ({norms[0]}), whose running statistics torch.func cannot update per seed"
    try:
        stack = FunctionalStack(models).train()
        stack(torch.stack([x, x])).sum().backward()
    except Exception as exc:  # the user's forward under vmap: whatever it raises means the plain path
        if "random" in str(exc).lower():
            return (
                f"{name} draws random numbers in training (dropout?), which vmap cannot draw as each seed's plain run"
            )
        return f"{name} does not run under torch.vmap ({first_line(exc)})"
    return None
