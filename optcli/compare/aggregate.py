"""From trials to what a comparison reports: per optimizer the mean and spread over seeds of every metric, the
verdict per metric (whether the winner's lead beats the seed-to-seed spread: a paired t-test over seeds), and the
loss curves. The same whether the trials ran here or came from several machines (merge)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from optcli.compare.results import Trial
from optcli.compare.runners import OptimizerSpec
from optcli.compare.stats import Target, mean_std, paired_verdict, time_to_target
from optcli.engine.loop import History
from optcli.rundir.run import warm_seconds_per_epoch

# (key, label, lower is better)
METRICS = [
    ("final_train_loss", "final train loss", True),
    ("best_val_loss", "best val loss", True),
    ("val_accuracy", "val accuracy", False),
    ("test_accuracy", "test accuracy", False),
    ("val_r2", "val R²", False),
]
TARGET_KEYS = ("target_epoch", "target_steps", "target_seconds")
EXTRA_KEYS = (
    "epochs_to_best",
    "seconds_per_epoch",
    "seconds_per_epoch_median_warm",
    "state_bytes",
    "final_value",
    "distance_to_min",
)


@dataclass(frozen=True)
class Outcome:
    """What a comparison reports about its trials."""

    rows: list[dict]  # one per optimizer: mean and std over seeds of every metric
    verdicts: list[dict]
    curves: dict[str, dict[str, list]]


def outcome(
    specs: list[OptimizerSpec],
    trials: list[Trial],
    *,
    seeds: list[int],
    epochs: int,
    target: Target | None = None,
    floor: float | None = None,
) -> Outcome:
    """Tables, verdicts and curves from the trials."""
    verdicts = [
        v
        for key, name, lower in METRICS
        if (v := verdict(trials, metric=key, name=name, lower_better=lower, seeds=seeds))
    ]
    if target is not None:
        verdicts.insert(0, target_verdict(specs, trials, seeds, target))
    return Outcome(aggregate(specs, trials, target, floor), verdicts, curves(specs, trials, epochs))


def trial_metrics(history: History, target: Target | None = None) -> dict[str, float | None]:
    best = history.best()
    last = history.epochs[-1] if history.epochs else None
    reached = time_to_target(history, target) if target is not None else None
    return {
        "target_epoch": reached["epoch"] if reached else None,
        "target_steps": reached["steps"] if reached else None,
        "target_seconds": reached["seconds"] if reached else None,
        "final_train_loss": last.train_loss if last else None,
        "best_val_loss": best.val_loss if best else None,
        "val_accuracy": best.val_accuracy if best else None,
        "test_accuracy": history.test_accuracy,
        "val_r2": best.val_r2 if best else None,
        "epochs_to_best": best.epoch if best else None,
        "seconds_per_epoch": statistics.fmean(e.seconds for e in history.epochs) if history.epochs else None,
        "seconds_per_epoch_median_warm": warm_seconds_per_epoch(history),
        "state_bytes": last.dynamics["state_bytes"] if last and last.dynamics else None,
        "final_value": last.position["value"] if last and last.position else None,
        "distance_to_min": last.position["distance"] if last and last.position else None,
    }


def aggregate(
    specs: list[OptimizerSpec], trials: list[Trial], target: Target | None = None, floor: float | None = None
) -> list[dict]:
    """Per optimizer: mean and std over its completed seeds; time to target over the seeds that met it (a
    diverged run counts as not reached); the excess validation loss over the task's floor when it is known."""
    rows = []
    for spec in specs:
        mine = [t for t in trials if t.label == spec.label]
        done = [t for t in mine if t.history.finished]
        row: dict[str, Any] = {
            "label": spec.label,
            "optimizer": spec.name,
            "hyperparameters": spec.kwargs,
            "seeds": len(mine),
            "completed": len(done),
        }
        for key in [m[0] for m in METRICS] + list(EXTRA_KEYS):
            values = [v for t in done if (v := trial_metrics(t.history)[key]) is not None]
            row[key], row[key + "_std"] = mean_std(values)
        if floor is not None and row["best_val_loss"] is not None:
            row["excess_val_loss"] = row["best_val_loss"] - floor
        if target is not None:
            row.update(_target_columns(mine, target))
        row.update(_status_columns(mine))
        rows.append(row)
    return rows


def _target_columns(mine: list[Trial], target: Target) -> dict[str, Any]:
    reached = [m for t in mine if (m := trial_metrics(t.history, target))["target_steps"] is not None]
    out: dict[str, Any] = {"target_reached": len(reached)}
    for key in TARGET_KEYS:
        out[key], out[key + "_std"] = mean_std([float(v) for m in reached if (v := m[key]) is not None])
    return out


def _status_columns(mine: list[Trial]) -> dict[str, Any]:
    diverged = [t for t in mine if t.history.status == "diverged"]
    failed = [t for t in mine if t.history.status == "failed"]
    early = [t for t in mine if t.history.status == "stopped_early"]
    kinds = (("diverged", diverged), ("failed", failed), ("stopped early", early))
    return {
        "status": ", ".join(f"{kind} {len(ts)}/{len(mine)}" for kind, ts in kinds if ts) or "completed",
        "failed": [{"seed": t.seed, "error": t.history.error} for t in failed],
        "diverged_at": [{"seed": t.seed, **(t.history.diverged_at or {})} for t in diverged],
    }


def verdict(
    trials: list[Trial],
    *,
    metric: str,
    name: str,
    lower_better: bool,
    seeds: list[int],
    target: Target | None = None,
) -> dict | None:
    """The best optimizer on one metric, and whether its lead over the runner-up beats the seed-to-seed spread."""
    per_label: dict[str, dict[int, float]] = {}
    for t in trials:
        value = trial_metrics(t.history, target)[metric] if t.history.finished else None
        if value is not None:
            per_label.setdefault(t.label, {})[t.seed] = value
    return paired_verdict(per_label, seeds=seeds, metric=metric, name=name, lower_better=lower_better)


def curves(specs: list[OptimizerSpec], trials: list[Trial], epochs: int) -> dict[str, dict[str, list]]:
    """Per optimizer and epoch: [mean, std, min, max] over the seeds that reached it with a finite loss; up to the
    last epoch any trial reached (the work done, not the `epochs` asked: a stopped run of 10**15 epochs has a few)."""
    out: dict[str, dict[str, list]] = {}
    reached = min(epochs, max((len(t.history.epochs) for t in trials), default=0))
    for spec in specs:
        mine = [t.history.epochs for t in trials if t.label == spec.label]
        out[spec.label] = {}
        for kind in ("train_loss", "val_loss"):
            points = []
            for e in range(reached):
                vals = [v for h in mine if len(h) > e and (v := getattr(h[e], kind)) is not None and math.isfinite(v)]
                points.append([*mean_std(vals), min(vals, default=None), max(vals, default=None)])
            out[spec.label][kind] = points
    return out


def target_verdict(specs: list[OptimizerSpec], trials: list[Trial], seeds: list[int], target: Target) -> dict:
    """Who reached the target on how many seeds, and, among those that reached it on every seed, whether the one
    with the fewest optimizer steps beats the next by more than the seed-to-seed spread."""
    counts = {
        s.label: sum(1 for t in trials if t.label == s.label and time_to_target(t.history, target)) for s in specs
    }
    reach = ", ".join(f"{label} {k}/{len(seeds)}" for label, k in counts.items())
    name = f"optimizer steps to {target.text}"
    out = verdict(trials, metric="target_steps", name=name, lower_better=True, seeds=seeds, target=target)
    if out is None:
        return {"metric": "target_steps", "name": name, "best": None, "reached": counts, "text": f"reached by {reach}"}
    return {**out, "reached": counts, "text": f"{out['text']}; reached by {reach}"}
