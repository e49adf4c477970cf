"""The seeds of one optimizer trained as one stacked model, where that computes what the plain path computes.

Every parameter gets a leading seed dimension (fc1.weight: seeds x out x in), a Linear becomes one batched
matmul (`torch.baddbmm`) over the seeds, and ONE optimizer steps the stacked tensors. The per-seed losses are
summed before backward(), so the gradient of a seed's slice is the gradient of that seed's loss alone. That is
the same update as training each seed apart exactly when the optimizer's update is elementwise: it reads each
parameter entry's own gradient and state and nothing else (SGD, Adam, RMSprop, ...). Optimizers with per-tensor
norms or trust ratios (LBFGS, Lamb/LARS, Muon, Adafactor) would mix the seeds and are never stacked.

Fairness is kept per seed: the initial weights are built per seed exactly as `trials.run_trial` builds them
(then stacked), each seed gets its own batch order, and each seed's dropout masks come from a generator of its
own seeded as the plain path seeds torch's global one, drawn in the same order and sizes, so they are the same
masks. A seed whose loss diverges is removed from the stack (with its optimizer state) at the end of the epoch
where the plain run would stop: it does not move afterwards (Adam would move it even with a zero gradient).
Where stacking could change a result, `stacking_refusal` says why in one line and the plain path runs instead.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from optcli.compare.runners import OptimizerSpec, Plan, TrialCallbacks, TrialRunner, _interrupted, run_trial
from optcli.config import Config
from optcli.engine.build import seed_torch
from optcli.engine.dynamics import Dynamics
from optcli.engine.loop import EVAL_BATCH, EpochMetrics, History, make_loss
from optcli.engine.model import MLP, build_model, dropout_mask
from optcli.engine.optimizers import build_optimizer, build_scheduler, resolve_optimizer, scheduler_classes
from optcli.tasks import Data, Split, epoch_permutation, steps_per_epoch

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
    if cfg.data.name == "function":
        return "a 2-D test function's model is the point itself, not an MLP"
    if cls not in elementwise_optimizers():
        return f"{cls.__name__} is not on the elementwise list (optcli.engine.stacked.ELEMENTWISE)"
    if cfg.train.grad_clip is not None:
        return "train.grad_clip clips each model's global gradient norm"
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
    if cfg.model.dropout > 0 and device.type != "cpu":
        return f"dropout masks on {device.type} come from one global generator, not one per seed"
    return None


class StackedLinear(nn.Module):
    """`seeds` Linear layers as one: x (seeds, batch, in) -> (seeds, batch, out) in one batched matmul."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))
        self.weight.requires_grad_(layers[0].weight.requires_grad)
        self.bias.requires_grad_(layers[0].bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


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
            else:
                layers[name] = module  # activations act elementwise
        super().__init__(layers)
        self.generators = generators

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


def retire(model: StackedMLP, optimizer: torch.optim.Optimizer, keep: list[int]) -> None:
    """Remove the seeds not in `keep` from the model and from every per-entry optimizer state tensor (the same
    Parameter objects stay in the optimizer, with fewer slices), so a finished seed no longer moves."""
    index = torch.tensor(keep, device=next(model.parameters()).device)
    old = {p: p.shape for p in model.parameters()}
    model.keep(index)
    for p, shape in old.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == shape:
                optimizer.state[p][key] = value[index]


class _SeedSlice:
    """One seed's slice of a stacked parameter, seen as a parameter by dynamics.Dynamics (grad, detach())."""

    def __init__(self, param: nn.Parameter, view: _SeedView):
        self.param, self.view, self.requires_grad, self.device = param, view, param.requires_grad, param.device

    @property
    def grad(self) -> torch.Tensor | None:
        return None if self.param.grad is None else self.param.grad[self.view.slot]

    def detach(self) -> torch.Tensor:
        return self.param.detach()[self.view.slot]


class _SeedView:
    """One seed of a StackedMLP as dynamics.Dynamics reads a model: named parameters, here its slices."""

    def __init__(self, model: StackedMLP, slot: int):
        self.model, self.slot = model, slot

    def named_parameters(self):
        return [(name, _SeedSlice(p, self)) for name, p in self.model.named_parameters()]


def seed_state_bytes(optimizer: torch.optim.Optimizer, seeds: int) -> int:
    """The bytes one seed's plain optimizer would hold: its slice of every per-entry state tensor, and the
    per-tensor ones (Adam's step) whole."""
    total = 0
    for p, state in optimizer.state.items():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size() // (seeds if v.shape == p.shape else 1)
    return total


def _sample_sum(loss: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    return loss * n if reduction == "mean" else loss


def _train_epoch(cfg: Config, model: StackedMLP, optimizer, loss_fn, split: Split, perms: torch.Tensor) -> torch.Tensor:
    """train.train_one_epoch for every live seed at once; returns each batch's loss sums (seeds, batches)."""
    model.train()
    seeds, n, batch_size = perms.shape[0], len(split), cfg.data.batch_size
    n_batches, accumulate = math.ceil(n / batch_size), cfg.train.accumulate
    losses = torch.zeros(seeds, n_batches, device=split.x.device)  # a seed's row sums as the plain path's vector
    scale = 1.0 / accumulate if loss_fn.reduction == "mean" else 1.0
    optimizer.zero_grad(set_to_none=True)
    for i, start in enumerate(range(0, n, batch_size)):
        idx = perms[:, start : start + batch_size]
        x, y = split.x[idx], split.y[idx]
        out = model(x)
        per_seed = torch.stack([loss_fn(out[s], y[s]) for s in range(seeds)])
        (per_seed.sum() * scale).backward()  # the sum keeps each slice's gradient that of its own seed's loss
        if (i + 1) % accumulate == 0 or i + 1 == n_batches:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses[:, i] = _sample_sum(per_seed.detach(), idx.shape[1], loss_fn.reduction)
    return losses


@torch.no_grad()
def _evaluate(model: StackedMLP, loss_fn, split: Split, seeds: int) -> list[tuple[float, float | None]]:
    """train.evaluate for every live seed: the same chunks, sums and order, per slice."""
    model.eval()
    sums = torch.zeros(seeds, 2, device=split.x.device)
    classify = split.y.dtype == torch.long
    for start in range(0, len(split), EVAL_BATCH):
        x, y = split.x[start : start + EVAL_BATCH], split.y[start : start + EVAL_BATCH]
        out = model(x.expand(seeds, *x.shape))
        for s in range(seeds):
            sums[s, 0] += _sample_sum(loss_fn(out[s], y), len(x), loss_fn.reduction)
            if classify:
                sums[s, 1] += (out[s].argmax(dim=1) == y).sum()
    return [(total / len(split), (correct / len(split) if classify else None)) for total, correct in sums.tolist()]


def build_stacked_model(cfg: Config, data: Data, seeds: list[int]) -> StackedMLP:
    """Each seed's model built as build_model_and_optimizer builds it (seed, then build), then stacked."""
    device = data.train.x.device
    models = []
    for seed in seeds:
        seed_torch(seed)
        models.append(build_model(cfg.model, data.in_features, data.out_features).to(device))
    return StackedMLP(models, seeds).to(device)


def fit_stacked(
    cfg: Config, data: Data, spec: OptimizerSpec, seeds: list[int], *, on_epoch: Callable[[History], None] | None = None
) -> list[History]:
    """The histories that `run_trial(cfg, data, spec, seed)` gives for each seed, from one stacked model."""
    cfg = cfg.model_copy(update={"optimizer": spec.config()})
    device = data.train.x.device
    model = build_stacked_model(cfg, data, seeds)
    optimizer = build_optimizer(model, cfg.optimizer, device, fused=cfg.train.fused)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.train.epochs)
    loss_fn = make_loss(cfg)
    histories = {seed: History() for seed in seeds}
    live = list(seeds)
    views = {seed: _SeedView(model, slot) for slot, seed in enumerate(seeds)}
    # per seed, the measurements dynamics.Dynamics takes of a plain run, on the seed's slices
    dynamics = {seed: Dynamics(views[seed], optimizer) for seed in seeds} if cfg.train.dynamics else {}  # type: ignore[arg-type]
    epoch_steps = steps_per_epoch(len(data.train), cfg.data.batch_size, cfg.train.accumulate)
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        perms = torch.stack([epoch_permutation(len(data.train), seed, epoch, device) for seed in live])
        losses = _train_epoch(cfg, model, optimizer, loss_fn, data.train, perms)
        train_seconds = (time.perf_counter() - t0) / len(live)  # per seed, evaluation excluded, as a plain trial
        evals = _evaluate(model, loss_fn, data.val, len(live)) if data.val is not None else None
        lr, seconds = float(optimizer.param_groups[0]["lr"]), (time.perf_counter() - t0) / len(live)
        diverged = []
        for s, seed in enumerate(live):
            column = losses[s]
            finite = torch.isfinite(column)
            bad_step = None if bool(finite.all()) else int((~finite).nonzero()[0]) + 1
            val_loss, val_acc = evals[s] if evals is not None and bad_step is None else (None, None)
            if bad_step is None and val_loss is not None and not math.isfinite(val_loss):
                bad_step = len(column)
            history = histories[seed]
            previous = history.epochs[-1] if history.epochs else None
            metrics = EpochMetrics(
                epoch,
                column.sum().item() / len(data.train),
                val_loss,
                val_acc,
                lr,
                seconds,
                steps=(previous.steps if previous else 0) + epoch_steps,
                train_seconds=(previous.train_seconds if previous else 0.0) + train_seconds,
            )
            if seed in dynamics:
                dynamics[seed].epoch_end(metrics, column)
                metrics.dynamics["state_bytes"] = seed_state_bytes(optimizer, len(live))  # type: ignore[index]
            history.epochs.append(metrics)
            if bad_step is not None:
                history.status, history.diverged_at = "diverged", {"epoch": epoch, "step": bad_step}
                diverged.append(s)
            if on_epoch is not None:
                on_epoch(history)
        if diverged:
            keep = [s for s in range(len(live)) if s not in diverged]
            for s in diverged:
                if live[s] in dynamics:
                    dynamics.pop(live[s]).close()
            live = [live[s] for s in keep]
            if not live:
                break
            retire(model, optimizer, keep)
            for slot, seed in enumerate(live):
                views[seed].slot = slot
        if scheduler is not None:  # epoch-driven only (stacking_refusal): the same for every seed
            scheduler.step()
    for callback in dynamics.values():
        callback.close()
    for seed in live:
        histories[seed].status = "completed"
    if data.test is not None and live:
        for seed, (test_loss, test_acc) in zip(live, _evaluate(model, loss_fn, data.test, len(live)), strict=True):
            histories[seed].test_loss, histories[seed].test_accuracy = test_loss, test_acc
    return [histories[seed] for seed in seeds]


class StackedRunner(TrialRunner):
    """Runs a plan with the seeds of each optimizer spec stacked into one model where that is exact, and the
    plain path (run_trial) where it is not; `notes` holds one line per spec that could not be stacked."""

    def __init__(self, cfg: Config, data: Data, callbacks: TrialCallbacks | None = None):
        super().__init__(callbacks)
        self.cfg, self.data = cfg, data
        self.notes: list[str] = []  # one line per optimizer whose seeds ran the plain path, and why

    def run(self, plan: Plan) -> list[History]:
        groups: dict[str, tuple[OptimizerSpec, list[int]]] = {}
        for spec, seed in plan:
            key = _group_key(spec)
            groups.setdefault(key, (spec, []))[1].append(seed)
        results: dict[tuple[str, int], History] = {}
        try:
            self._run_groups(groups, results)
        except KeyboardInterrupt as exc:  # a stop signal: the finished trials are kept, as the serial runner keeps them
            keys = [(_group_key(s), seed) for s, seed in plan]
            raise _interrupted({i: results[k] for i, k in enumerate(keys) if k in results}, plan, exc) from None
        return [results[(_group_key(s), seed)] for s, seed in plan]

    def _run_groups(self, groups: dict, results: dict) -> None:
        cb = self.callbacks
        for key, (spec, seeds) in groups.items():
            reason = stacking_refusal(self.cfg, spec, self.data.train.x.device) if len(seeds) > 1 else "one seed"
            if reason is not None and len(seeds) > 1:
                self.notes.append(f"--vectorize: {spec.label} runs its seeds one by one: {reason}")
            if cb.on_trial_start:
                for seed in seeds:
                    cb.on_trial_start(spec.label, seed)
            if reason is None:
                histories = fit_stacked(self.cfg, self.data, spec, seeds, on_epoch=cb.on_epoch)
                results.update({(key, seed): h for seed, h in zip(seeds, histories, strict=True)})
            for seed in seeds:
                if reason is not None:  # stored one by one, so that an interruption keeps the finished ones
                    results[(key, seed)] = run_trial(self.cfg, self.data, spec, seed, on_epoch=cb.on_epoch)
                if cb.on_trial_done:
                    cb.on_trial_done(spec.label, seed, results[(key, seed)])


def _group_key(spec: OptimizerSpec) -> str:
    """Trials with equal keys differ only in their seed (tuning trials share a label but not an lr)."""
    return json.dumps([spec.label, spec.name, spec.kwargs], sort_keys=True, default=str)
