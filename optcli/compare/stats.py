"""Statistics over seeds: mean and spread, the verdict on whether a lead beats the seed-to-seed spread, and time
to target (the epoch, optimizer steps and training seconds at which a run first meets a metric's target)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from optcli.errors import UserError

CONFIDENCE = 0.95


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_verdict(
    per_label: dict[str, dict[int, float]], *, seeds: list[int], metric: str, name: str, lower_better: bool
) -> dict | None:
    """The best label on one metric (values per label and seed), and whether its lead over the runner-up beats
    the seed-to-seed spread: a paired t-test over seeds, two-sided, with a confidence interval of the lead."""
    from scipy import special  # Student's t distribution; scipy.stats would cost a second more to import

    full = {label: v for label, v in per_label.items() if len(v) == len(seeds)}  # ranked only with every seed done
    if len(full) < 2:
        return None
    sign = 1 if lower_better else -1
    ranked = sorted(full, key=lambda label: sign * statistics.fmean(full[label].values()))
    best, runner = ranked[0], ranked[1]
    diffs = [sign * (full[runner][s] - full[best][s]) for s in seeds]  # > 0 where the best was better on that seed
    out: dict = {
        "metric": metric,
        "name": name,
        "best": best,
        "runner_up": runner,
        "lead": statistics.fmean(diffs),
        "seeds": len(seeds),
        "test": "paired t-test over seeds",
        "p_value": None,
        "ci": None,
        "significant": None,
    }
    if len(seeds) < 2:
        out["text"] = (
            f"{best} leads {runner} on {name} by {out['lead']:.4g}, but with one seed "
            f"no claim can be made about the seed-to-seed spread (use --seeds 3 or more)"
        )
        return out
    sd = statistics.stdev(diffs)
    df, se = len(diffs) - 1, sd / math.sqrt(len(diffs))
    half = float(special.stdtrit(df, 0.5 + CONFIDENCE / 2)) * se
    out["ci"] = [out["lead"] - half, out["lead"] + half]
    out["p_value"] = float(2 * special.stdtr(df, -abs(out["lead"]) / se)) if sd > 0 else None  # two-sided
    out["significant"] = bool(out["ci"][0] > 0)
    spread = (
        f"{int(CONFIDENCE * 100)}% CI of the paired difference [{out['ci'][0]:.3g}, {out['ci'][1]:.3g}], "
        f"paired t-test over {len(seeds)} seeds" + (f", p={out['p_value']:.3g}" if out["p_value"] is not None else "")
    )
    if out["lead"] == 0:  # the same mean: neither leads, whatever the order of the ranking
        out["text"] = f"{best} and {runner} tie on {name}: the same mean over the seeds ({spread}), no clear winner"
    elif out["significant"]:
        out["text"] = (
            f"{best} beats {runner} on {name} by {out['lead']:.4g} ({spread}): larger than the seed-to-seed spread"
        )
    else:
        out["text"] = (
            f"{best} leads {runner} on {name} by {out['lead']:.4g} ({spread}): "
            f"within the seed-to-seed spread, no clear winner"
        )
    return out


@dataclass(frozen=True)
class Target:
    """A value of one per-epoch metric to reach: lower is better for losses, higher for accuracies."""

    metric: str
    value: float
    higher_is_better: bool

    def met(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if self.higher_is_better else value <= self.value

    @property
    def text(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.value:g}"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "higher_is_better": self.higher_is_better}


def parse_target(text: str, metrics: list[str]) -> Target:
    """'val_accuracy=0.97' -> Target; the direction follows from the metric (accuracy and R² up, losses down)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UserError(f"--target {text}: expected metric=value, e.g. val_accuracy=0.97 or val_loss=0.1")
    if name not in metrics:
        raise UserError(f"--target {text}: unknown metric '{name}' (per-epoch metrics: {', '.join(metrics)})")
    from optcli.tasks.base import higher_is_better

    if higher_is_better(name):  # accuracy, R²
        higher = True
    elif "loss" in name:
        higher = False
    else:
        raise UserError(f"--target {text}: {name} is neither a loss nor an accuracy; no direction to reach it in")
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"--target {text}: the value '{raw.strip()}' is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"--target {text}: the value must be finite")
    return Target(name, value, higher)


def time_to_target(history: Any, target: Target) -> dict | None:
    """The first epoch whose evaluation meets the target, with the optimizer steps and the training seconds
    (evaluation excluded) taken until then; None when the run never met it."""
    for e in history.epochs:
        if target.met(getattr(e, target.metric, None)):
            return {"epoch": e.epoch, "steps": e.steps, "seconds": e.train_seconds}
    return None


def steps_to_target(history: Any, target: Target) -> int | None:
    """Optimizer steps until the target was first met at an epoch's evaluation (None: never met)."""
    reached = time_to_target(history, target)
    return reached["steps"] if reached else None
