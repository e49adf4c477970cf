"""The seeds of one optimizer trained as one stacked model, where that computes what the plain path computes.

Every parameter gets a leading seed dimension (fc1.weight: seeds x in x out, each seed's weight transposed), a
Linear of the built-in MLP becomes one batched matmul (`torch.baddbmm`) over the seeds, any other model (a user's)
runs through torch.func (engine/functional_stack.py), and ONE optimizer steps the stacked tensors. The per-seed
losses are summed before backward(), so the gradient of a seed's slice is the gradient of that seed's loss alone.
That is the same update as training each seed apart exactly when the optimizer's update is elementwise: it reads each
parameter entry's own gradient and state and nothing else (SGD, Adam, RMSprop, ...). Optimizers with per-tensor
norms or trust ratios (LBFGS, Lamb/LARS, Muon, Adafactor) would mix the seeds and are never stacked.

Fairness is kept per seed: the initial weights are built per seed exactly as `compare.runners.run_trial` builds them
(then stacked), each seed gets its own batch order, and each seed's dropout masks come from a generator of its
own seeded as the plain path seeds torch's global one, drawn in the same order and sizes, so they are the same
masks. A seed whose loss diverges is removed from the stack (with its optimizer state) at the end of the epoch
where the plain run would stop: it does not move afterwards (Adam would move it even with a zero gradient).
Where stacking could change a result, `stacking_refusal` says why in one line and the plain path runs instead.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optcli.config import Config
from optcli.engine.build import build_task_model, seed_torch
from optcli.engine.dynamics import Dynamics
from optcli.engine.functional_stack import FunctionalStack, vmap_refusal
from optcli.engine.loop import (
    EVAL_BATCH,
    History,
    add_eval_batch,
    averages,
    divergence,
    eval_width,
    make_loss,
    train_one_epoch,
)
from optcli.engine.model import MLP, dropout_mask
from optcli.engine.optimizers import (
    OptimizerSpec,
    build_optimizer,
    build_scheduler,
    current_lr,
    resolve_optimizer,
    scheduler_classes,
    scheduler_interval,
)
from optcli.engine.stepping import Loss, PlainStep, StepSettings, sample_sum
from optcli.tasks import Data, Split, epoch_permutation, steps_per_epoch
from optcli.tasks.registry import get_task

# The one place that says which optimizers update elementwise, as (module, class): their step reads an entry's
# own gradient and state and per-tensor scalars that depend on the step count only. tests/test_vectorized.py
# checks every entry by stepping a stacked tensor against its slices stepped apart.
ELEMENTWISE = (
    ("torch.optim", "SGD"),
    ("torch.optim", "Adam"),
    ("torch.optim", "AdamW"),
    ("torch.optim", "Adamax"),
    ("torch.optim", "NAdam"),
    ("torch.optim", "RAdam"),
    ("torch.optim", "RMSprop"),
    ("torch.optim", "Adagrad"),
    ("torch.optim", "Adadelta"),
    ("torch.optim", "ASGD"),
    ("torch.optim", "Rprop"),
    ("pytorch_optimizer", "Lion"),
)


def elementwise_optimizers() -> list[type]:
    """The classes of ELEMENTWISE that can be imported here (pytorch-optimizer is an optional extra)."""
    classes = []
    for module, name in ELEMENTWISE:
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return classes


def stacking_refusal(cfg: Config, spec: OptimizerSpec, device: torch.device) -> str | None:
    """Why the seeds of `spec` must run the plain path (one line), or None when stacking them is exact."""
    cls = resolve_optimizer(spec.name)
    own_model = get_task(cfg.data).own_model_note
    if own_model is not None:
        return own_model
    if get_task(cfg.data).may_stream():
        return f"data.name {cfg.data.name} may be streamed from its Dataset (data.stream=false holds it in memory)"
    if cls not in elementwise_optimizers():
        return f"{cls.__name__} is not on the elementwise list (optcli.engine.stacked.ELEMENTWISE)"
    if cfg.model.batch_norm:
        return "model.batch_norm keeps batch statistics per model"
    if cfg.scheduler is not None and issubclass(
        scheduler_classes().get(cfg.scheduler.name.lower(), object), torch.optim.lr_scheduler.ReduceLROnPlateau
    ):
        return "a metric-driven scheduler (ReduceLROnPlateau) needs each seed's own metric"
    if cfg.train.early_stopping is not None:
        return "train.early_stopping ends each seed at its own epoch"
    if cfg.train.precision != "32":
        return f"train.precision {cfg.train.precision} rounds the stacked matmuls differently from the plain ones"
    if cfg.model.is_user_model:
        return vmap_refusal(cfg)
    if cfg.model.dropout > 0 and device.type != "cpu":
        return f"dropout masks on {device.type} come from one global generator, not one per seed"
    return None


class StackedLinear(nn.Module):
    """`seeds` Linear layers as one: x (seeds, batch, in) -> (seeds, batch, out) in one batched matmul; `weight`
    holds each seed's weight transposed (seeds, in, out), `bias` each seed's bias as a row (seeds, 1, out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        # each seed's weight transposed, (seeds, in, out), as baddbmm reads it: its gradient then comes out of bmm's
        # backward contiguous. Stored (seeds, out, in), AccumulateGrad (or, with a transposed view, the fused
        # optimizer) would copy a transposed gradient every step: a third of a stacked MNIST step. The optimizer
        # is elementwise and the dynamics take norms, so neither minds the transposition.
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().t() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1))
        self.weight.requires_grad_(layers[0].weight.requires_grad)
        self.bias.requires_grad_(layers[0].bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class StackedDropout(nn.Dropout):
    """Dropout with one generator per seed, each drawing the masks the plain path draws for its seed."""

    def __init__(self, p: float, generators: list[torch.Generator]):
        super().__init__(p)
        self.generators = generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * torch.stack([dropout_mask(x[s], self.p, g) for s, g in enumerate(self.generators)])


class StackedMLP(nn.Sequential):
    """The per-seed MLPs as one model with the same parameter names (fc1.weight, out.bias, ...), so optimizer
    param groups (optimizer.groups) and frozen parameters (model.freeze) apply to it unchanged."""

    def __init__(self, models: list[MLP], seeds: list[int]):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]  # as seed_torch(seed) in run_trial
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in models[0].named_children():
            if isinstance(module, nn.Linear):
                layers[name] = StackedLinear([dict(m.named_children())[name] for m in models])  # type: ignore[misc]
            elif isinstance(module, nn.Dropout):
                layers[name] = StackedDropout(module.p, generators)
            elif getattr(module, "inplace", None) is False:  # ReLU, LeakyReLU, ELU
                # in place on the batched matmul's output, which nothing else reads (baddbmm's backward does not):
                # one tensor less to allocate and write per layer and step, the same values
                activation: Any = copy.copy(module)  # nn.ReLU and the others declare inplace: bool
                activation.inplace = True
                layers[name] = activation
            else:
                layers[name] = module  # activations act elementwise
        super().__init__(layers)
        self.generators = generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each layer's forward() without Module.__call__: nothing hooks a stacked model, and the hook dispatch of
        # three or four layers was a tenth of a small model's stacked step
        for layer in self:
            x = layer.forward(x)
        return x

    def keep(self, index: torch.Tensor) -> None:
        """Only the seeds at `index` go on; the others' slices are dropped (see retire)."""
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data[index]
        kept = [self.generators[i] for i in index.tolist()]
        self.generators[:] = kept
        for module in self.modules():
            if isinstance(module, StackedDropout):
                module.generators = self.generators


def retire(model: StackedMLP | FunctionalStack, optimizer: torch.optim.Optimizer, keep: list[int]) -> None:
    """Remove the seeds not in `keep` from the model and from every per-entry optimizer state tensor (the same
    Parameter objects stay in the optimizer, with fewer slices), so a finished seed no longer moves."""
    index = torch.tensor(keep, device=next(model.parameters()).device)
    old = {p: p.shape for p in model.parameters()}
    model.keep(index)
    for p, shape in old.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == shape:
                optimizer.state[p][key] = value[index]


def seed_state_bytes(optimizer: torch.optim.Optimizer, seeds: int) -> int:
    """The bytes one seed's plain optimizer would hold: its slice of every per-entry state tensor, and the
    per-tensor ones (Adam's step) whole."""
    total = 0
    for p, state in optimizer.state.items():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size() // (seeds if v.shape == p.shape else 1)
    return total


class StackedStep(PlainStep):
    """PlainStep for every live seed at once: the per-seed losses are summed before backward(), which keeps each
    slice's gradient that of its own seed's loss; returns each seed's loss summed over the batch's samples."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        loss, sums = stacked_loss(self.loss_fn, self.model(x), y, scale=self.scale)
        self.backward(loss)
        if last:
            self.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sums

    def step(self) -> None:
        if self.settings.grad_clip is not None:
            clip_per_seed(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()


@torch.no_grad()
def clip_per_seed(params: Iterator[nn.Parameter], max_norm: float) -> None:
    """nn.utils.clip_grad_norm_ for each seed's slices: each seed's global gradient norm (the norm of its
    per-tensor norms, as torch takes it) clipped to max_norm, with torch's coefficient max_norm / (norm + 1e-6)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (tensors, seeds)
    coef = (max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))


# losses whose "mean" is the plain mean of their reduction="none" values (no class weights, no ignored targets)
ELEMENTWISE_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.cross_entropy)


def stacked_loss(
    loss_fn: Loss, out: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sum over seeds of each seed's loss times `scale`, to call backward() on; each seed's loss summed over
    its samples, detached). One loss call over all seeds' samples where the loss is a mean or sum of per-sample
    values (its Python cost and autograd nodes are a third of a small model's step), one call per seed otherwise."""
    fn, kwargs = getattr(loss_fn, "fn", None), getattr(loss_fn, "kwargs", {})
    seeds, n = out.shape[:2]
    if fn in ELEMENTWISE_LOSSES and loss_fn.reduction in ("mean", "sum") and not {"weight", "ignore_index"} & {*kwargs}:
        if fn is F.cross_entropy:  # classes on dim 1: seeds and samples flattened into one batch dimension
            out, y = out.flatten(0, 1), y.flatten(0, 1)
        values = fn(out, y, reduction="none", **kwargs)
        sums = values.detach().view(seeds, -1).sum(dim=1)
        # a seed's mean is its sum times 1/n: the same 1/n reaches every sample's gradient as in mean's backward
        weight = scale / n if loss_fn.reduction == "mean" else scale
        return (values.sum() * weight if weight != 1 else values.sum()), sums
    per_seed = torch.stack([loss_fn(out[s], y[s]) for s in range(seeds)])
    return per_seed.sum() * scale, sample_sum(per_seed.detach(), n, loss_fn.reduction)


# An epoch's permuted copy of the training split for all seeds up to this size is gathered in one call and each batch
# is a view of it: two index_select calls per step were a tenth of a small model's stacked step.
EPOCH_GATHER_BYTES = 64 * 2**20


def _batches(split: Split, batch_size: int, perms: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """tasks.batches for every live seed: (seeds, batch, ...) in each seed's own order."""
    row_bytes = split.x[0].nbytes + split.y[0].nbytes
    if perms.numel() * row_bytes <= EPOCH_GATHER_BYTES:
        x, y = _gather(split, perms)
        yield from zip(x.split(batch_size, dim=1), y.split(batch_size, dim=1), strict=True)
        return
    for start in range(0, len(split), batch_size):
        yield _gather(split, perms[:, start : start + batch_size])


def _gather(split: Split, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows at idx (seeds, n) as (seeds, n, ...) tensors; index_select, as tasks.batches."""
    flat = idx.reshape(-1)
    return (
        split.x.index_select(0, flat).view(*idx.shape, *split.x.shape[1:]),
        split.y.index_select(0, flat).view(*idx.shape, *split.y.shape[1:]),
    )


@torch.no_grad()
def _evaluate(
    model: StackedMLP | FunctionalStack, loss_fn: Loss, split: Split, seeds: int
) -> list[tuple[float, float | None, float | None]]:
    """loop.evaluate for every live seed: the same chunks, sums and order, per slice."""
    model.eval()
    sums = torch.zeros(seeds, eval_width(split), device=split.x.device)
    for start in range(0, len(split), EVAL_BATCH):
        x, y = split.x[start : start + EVAL_BATCH], split.y[start : start + EVAL_BATCH]
        out = model(x.expand(seeds, *x.shape))
        for s in range(seeds):
            add_eval_batch(sums[s], out[s], y, loss_fn)
    return [averages(row, split) for row in sums.tolist()]


def build_stacked_model(cfg: Config, data: Data, seeds: list[int]) -> StackedMLP | FunctionalStack:
    """Each seed's model built as build_model_and_optimizer builds it (seed, then build), then stacked: the MLP
    as baddbmm layers, a user's model through torch.func."""
    device = data.train.x.device
    models = []
    for seed in seeds:
        seed_torch(seed)
        models.append(build_task_model(cfg, data.in_features, data.out_features).to(device))
    if cfg.model.is_user_model:
        return FunctionalStack(models).to(device)
    return StackedMLP(models, seeds).to(device)  # type: ignore[arg-type]


class _Stack:
    """The live seeds of one optimizer spec as one stacked model and optimizer, with each seed's history."""

    def __init__(self, cfg: Config, data: Data, seeds: list[int]):
        self.cfg, self.data, self.live = cfg, data, list(seeds)
        self.model = build_stacked_model(cfg, data, seeds)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, data.train.x.device, fused=cfg.train.fused)
        steps = steps_per_epoch(len(data.train), cfg.data.batch_size, cfg.train.accumulate)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.train.epochs, steps)
        # a per-step schedule (OneCycleLR) is stepped after every optimizer step, as loop.fit steps it
        self.per_step = self.scheduler is not None and scheduler_interval(cfg.scheduler) == "step"
        self.loss_fn = make_loss(cfg)
        self.step = StackedStep(self.model, self.optimizer, self.loss_fn, StepSettings.of(cfg))
        self.histories = {seed: History() for seed in seeds}
        # the measurements dynamics.Dynamics takes of a plain run, per seed slice
        self.dynamics = Dynamics(self.model, self.optimizer, stacked=True) if cfg.train.dynamics else None

    def epoch(self, epoch: int, on_epoch: Callable[[History], None] | None) -> list[int]:
        """One epoch of every live seed, recorded in each seed's history; returns the slots that diverged."""
        data, t0, n_live = self.data, time.perf_counter(), len(self.live)
        lr = current_lr(self.optimizer)
        perms = torch.stack([epoch_permutation(len(data.train), s, epoch, data.train.x.device) for s in self.live])
        n_batches = math.ceil(len(data.train) / self.cfg.data.batch_size)
        on_step = self.scheduler.step if self.per_step else None
        batches = _batches(data.train, self.cfg.data.batch_size, perms)
        losses = train_one_epoch(self.step, batches, n_batches=n_batches, on_step=on_step)
        train_seconds = (time.perf_counter() - t0) / n_live  # per seed, evaluation excluded, as a plain trial
        evals = _evaluate(self.model, self.loss_fn, data.val, n_live) if data.val is not None else None
        seconds = (time.perf_counter() - t0) / n_live
        layers = self.dynamics.measure() if self.dynamics is not None else None
        diverged = []
        for s, seed in enumerate(self.live):
            column, history = losses[s], self.histories[seed]
            finite = bool(torch.isfinite(column).all())
            val_loss, val_acc, val_r2 = evals[s] if evals is not None and finite else (None, None, None)
            bad_step = divergence(column, val_loss)
            metrics = history.next_epoch(
                epoch=epoch,
                losses=(column.sum().item() / len(data.train), val_loss, val_acc, val_r2),
                lr=lr,
                seconds=seconds,
                steps=steps_per_epoch(len(data.train), self.cfg.data.batch_size, self.step.accumulate),
                train_seconds=train_seconds,
            )
            if layers is not None:
                metrics.dynamics = {"layers": layers[s], "state_bytes": seed_state_bytes(self.optimizer, n_live)}
            history.epochs.append(metrics)
            if bad_step is not None:
                history.set_status(diverged_at={"epoch": epoch, "step": bad_step})
                diverged.append(s)
            if on_epoch is not None:
                on_epoch(history)
        return diverged

    def retire(self, slots: list[int]) -> None:
        """The seeds at `slots` stop: out of the model and the optimizer state, their measurements closed."""
        keep = [s for s in range(len(self.live)) if s not in slots]
        self.live = [self.live[s] for s in keep]
        if self.live:
            retire(self.model, self.optimizer, keep)
            if self.dynamics is not None:
                self.dynamics.keep(torch.tensor(keep, device=self.data.train.x.device))

    def finish(self) -> None:
        if self.dynamics is not None:
            self.dynamics.close()
        for seed in self.live:
            self.histories[seed].set_status(done=True)
        if self.data.test is not None and self.live:
            results = _evaluate(self.model, self.loss_fn, self.data.test, len(self.live))
            for seed, (test_loss, test_acc, _) in zip(self.live, results, strict=True):
                self.histories[seed].test_loss, self.histories[seed].test_accuracy = test_loss, test_acc


def fit_stacked(
    cfg: Config, data: Data, spec: OptimizerSpec, seeds: list[int], *, on_epoch: Callable[[History], None] | None = None
) -> list[History]:
    """The histories that `run_trial(cfg, data, spec, seed)` gives for each seed, from one stacked model."""
    stack = _Stack(cfg.model_copy(update={"optimizer": spec.config()}), data, seeds)
    for epoch in range(1, cfg.train.epochs + 1):
        diverged = stack.epoch(epoch, on_epoch)
        if diverged:
            stack.retire(diverged)
            if not stack.live:
                break
        if stack.scheduler is not None and not stack.per_step:  # not metric-driven (stacking_refusal): one for all
            stack.scheduler.step()
    stack.finish()
    return [stack.histories[seed] for seed in seeds]
