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
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from optcli.compare.comparison import Comparison, Prepared, prepare, run_and_save, run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.performance_profile import TAUS, curve, profile
from optcli.compare.runners import TrialCallbacks
from optcli.config import Config
from optcli.errors import RunInterrupted, UserError
from optcli.rundir import signals
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
    status: str = "completed"  # or interrupted: a stop signal ended it; the tasks run so far are kept
    interrupted_by: str | None = None
    warnings: list[str] = field(default_factory=list)  # a figure that could not be drawn

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
            "status": self.status,
            "interrupted_by": self.interrupted_by,
            "warnings": self.warnings,
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
    with signals.stop_on_signals():  # also between the tasks and while the summary is written
        tasks, stopped = run_tasks(cfgs, names, prepared, options, parent, on_task, on_plan, callbacks)
        with signals.held():
            result = summarize(tasks, parent=parent, stopped=stopped, started=started)
            result.warnings = write_multitask(result, parent)
    if stopped is not None:
        done = sum(c.status != "interrupted" for _, c in tasks)
        saved = f"{done} of {len(cfgs)} tasks finished, saved in {parent}"
        figures = [f"task {name}: {w}" for name, c in tasks for w in c.warnings] + result.warnings
        raise RunInterrupted(str(parent), stopped, saved=saved, warnings=figures)
    return result


def summarize(
    tasks: list[tuple[str, Comparison]], *, parent: Path, stopped: int | None, started: float
) -> MultiTaskComparison:
    """The measures and the profile over the tasks that ran to their end; every task run is listed."""
    keys, measures, unscored = set(), {}, {}
    for name, c in tasks:
        if c.status == "interrupted":
            continue
        key, measures[name], unscored[name] = task_measure(c)
        keys.add(key)
    measure = " or ".join(k for k in MEASURE_WHY if k in keys)
    why = " / ".join(MEASURE_WHY[k] for k in MEASURE_WHY if k in keys)
    return MultiTaskComparison(
        tasks,
        measure,
        why,
        measures,
        unscored,
        profile=profile(measures),
        run_dir=str(parent),
        wall_seconds=time.perf_counter() - started,
        status="interrupted" if stopped is not None else _status([c.status for _, c in tasks]),
        interrupted_by=signal.Signals(stopped).name if stopped is not None else None,
    )


def _status(statuses: list[str]) -> str:
    """failed when every task failed, partly_failed when some trial of any task failed, else completed."""
    if all(s == "failed" for s in statuses):
        return "failed"
    return "completed" if all(s == "completed" for s in statuses) else "partly_failed"


def write_multitask(result: MultiTaskComparison, parent: Path) -> list[str]:
    """summary.json, profile.png and report.html; a profile that cannot be drawn is a warning line (returned, and
    in summary.json's warnings)."""
    write_json(parent / "summary.json", result.to_dict())
    warning = None
    if result.measures:
        from optcli.report.plots import drawn
        from optcli.report.profile import save_profile_plot

        taus, rho = curve(result.measures)
        warning = drawn(parent / "profile.png", lambda p: save_profile_plot(taus, rho, p, measure=result.measure))
    if warning:
        write_json(parent / "summary.json", {**result.to_dict(), "warnings": [*result.warnings, warning]})
    from optcli.report.html import report_after_run

    report_after_run(parent)  # one page, a section per task; when it fails the CLI says there is none
    return [warning] if warning else []


def run_tasks(
    cfgs: list[tuple[str | None, Config]],
    names: list[str],
    prepared: list[Prepared],
    options: CompareOptions,
    parent: Path,
    on_task: Callable[[str], None] | None,
    on_plan: Callable[[int], None] | None,
    callbacks: TrialCallbacks | None,
) -> tuple[list[tuple[str, Comparison]], int | None]:
    """Each task's comparison in its folder of `parent`, until a stop signal: the tasks run so far (the one it cut
    saved as interrupted) and the signal, or None."""
    tasks: list[tuple[str, Comparison]] = []
    try:
        for name, (_, cfg), ready in zip(names, cfgs, prepared, strict=True):
            if on_task:
                on_task(name)
            task_cfg = cfg.model_copy(update={"out_dir": str(parent), "name": name})
            c = run_and_save(task_cfg, ready, options, on_plan=on_plan, callbacks=callbacks)
            tasks.append((name, c))
            if c.interrupted_by is not None:
                return tasks, signal.Signals[c.interrupted_by]
    except KeyboardInterrupt as exc:  # between two tasks
        return tasks, signals.signum_of(exc)
    return tasks, None
