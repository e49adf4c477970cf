"""One comparison over several tasks: the same optimizer specs on each task (one config each), each task's own
comparison, and a performance profile across the tasks (profile.py).

The per-task measure is the optimizer's steps to the task's target when the task has one (--target, once for
every task or once per --config): AlgoPerf's time to target, in optimizer steps, mean over seeds, infinite when
a seed did not reach it. Without a target it is the best validation loss
(the final training loss without a validation split), mean over seeds: a loss is >= 0 with 0 a perfect fit, so
its ratio to the best optimizer's loss on the same task is scale-free ("within a factor tau of the best loss"
means the same on a task whose losses are near 0.05 as on one near 20), where a difference would not be. It
measures the quality reached within the budget, not speed, and a task whose loss has a floor above 0 (noise)
compresses its ratios towards 1. An optimizer that diverged on any seed of a task scores infinity there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from optcli.compare.comparison import Comparison, Prepared, prepare, run_comparison, run_prepared
from optcli.compare.options import CompareOptions
from optcli.compare.performance_profile import TAUS, curve, profile
from optcli.compare.runners import TrialCallbacks
from optcli.config import Config
from optcli.errors import UserError
from optcli.rundir.files import create_run_dir, write_json

MEASURE_WHY = {
    "target_steps": "optimizer steps to the task's target, mean over seeds, infinite when a seed missed it "
    "(AlgoPerf's time to target): a count of steps has a true zero, so its ratio to the task's fastest is scale-free",
    "best_val_loss": "best validation loss, mean over seeds: losses are >= 0 with 0 a perfect fit, so a ratio "
    "to the task's best loss is scale-free across tasks (quality within the budget, not speed)",
    "final_train_loss": "final training loss, mean over seeds (no validation split): losses are >= 0 with 0 a "
    "perfect fit, so a ratio to the task's best loss is scale-free across tasks",
}


@dataclass
class MultiTaskComparison:
    tasks: list[tuple[str, Comparison]]
    measure: str
    measure_why: str
    measures: dict[str, dict[str, float]]  # task -> optimizer label -> measure (inf: see unscored)
    unscored: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> label -> why its measure is inf
    taus: list[float] = field(default_factory=lambda: list(TAUS))
    profile: dict[str, list[float]] = field(default_factory=dict)  # label -> rho(tau) for tau in taus
    run_dir: str | None = None
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731 strict JSON: "not reached" is null
        return {
            "tasks": [{"name": name, **c.to_dict()} for name, c in self.tasks],
            "measure": self.measure,
            "measure_why": self.measure_why,
            "measures": {t: {o: finite(v) for o, v in by.items()} for t, by in self.measures.items()},
            "unscored": self.unscored,
            "taus": self.taus,
            "profile": self.profile,
            "run_dir": self.run_dir,
            "wall_seconds": self.wall_seconds,
        }


def task_measure(c: Comparison) -> tuple[str, dict[str, float], dict[str, str]]:
    """The measure of each optimizer on one task, lower is better (module docstring), and why each infinite one
    is: the row's status when a seed did not finish, else the target missed on k of n seeds."""
    if c.target is not None:
        key = "target_steps"
        missed = lambda r: r["target_reached"] < r["seeds"]  # noqa: E731
    else:
        key = "best_val_loss" if any(r["best_val_loss"] is not None for r in c.rows) else "final_train_loss"
        missed = lambda r: r["completed"] < r["seeds"]  # noqa: E731
    values, unscored = {}, {}
    for r in c.rows:
        if not missed(r) and r[key] is not None and r[key] > 0:
            values[r["label"]] = float(r[key])
            continue
        values[r["label"]] = math.inf
        if r["completed"] < r["seeds"]:
            unscored[r["label"]] = r["status"]  # e.g. "diverged 1/3"
        elif c.target is not None:
            unscored[r["label"]] = f"not reached {r['target_reached']}/{r['seeds']}"
        else:
            unscored[r["label"]] = f"{key} {r[key]}"  # a loss of exactly 0 has no ratio to the best
    return key, values, unscored


def task_names(sources: list[str | None]) -> list[str]:
    names: list[str] = []
    for source in sources:
        base = Path(source).stem if source else "default"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def prepare_task(
    cfg: Config, spec_texts: list[str], options: CompareOptions, *, target: str | None, source: str
) -> Prepared:
    """One task's checks; a refusal names the config file it came from."""
    try:
        return prepare(cfg, spec_texts, options, target=target)
    except UserError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def run_compare(
    cfgs: list[tuple[str | None, Config]],
    spec_texts: list[str],
    options: CompareOptions,
    *,
    on_task: Callable[[str], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    callbacks: TrialCallbacks | None = None,
) -> Comparison | MultiTaskComparison:
    """One task: today's comparison. Several: the same specs on each, then the profile across them. Every task
    is checked before the first one trains."""
    if len(cfgs) == 1:
        return run_comparison(cfgs[0][1], spec_texts, options, on_plan=on_plan, callbacks=callbacks)
    started = time.perf_counter()
    names = task_names([source for source, _ in cfgs])
    targets = options.task_targets(len(cfgs))
    prepared = [
        prepare_task(cfg, spec_texts, options, target=target, source=source or f"task {name}")
        for name, (source, cfg), target in zip(names, cfgs, targets, strict=True)
    ]
    first = cfgs[0][1]
    parent = create_run_dir(first.out_dir, first.name, prefix="compare-tasks-")
    tasks = []
    for name, (_, cfg), ready in zip(names, cfgs, prepared, strict=True):
        if on_task:
            on_task(name)
        task_cfg = cfg.model_copy(update={"out_dir": str(parent), "name": name})
        tasks.append((name, run_prepared(task_cfg, ready, options, on_plan=on_plan, callbacks=callbacks)))
    keys, measures, unscored = set(), {}, {}
    for name, c in tasks:
        key, measures[name], unscored[name] = task_measure(c)
        keys.add(key)
    measure = " or ".join(k for k in MEASURE_WHY if k in keys)
    why = " / ".join(MEASURE_WHY[k] for k in MEASURE_WHY if k in keys)
    rho = profile(measures)
    result = MultiTaskComparison(
        tasks,
        measure,
        why,
        measures,
        unscored,
        profile=rho,
        run_dir=str(parent),
        wall_seconds=time.perf_counter() - started,
    )
    write_json(parent / "summary.json", result.to_dict())
    from optcli.report.profile import save_profile_plot

    save_profile_plot(*curve(measures), parent / "profile.png", measure=measure)
    from optcli.report.html import report_after_run

    report_after_run(parent)  # one page, a section per task; when it fails the CLI says there is none
    return result
