"""A fair comparison of optimizers: for each seed, every optimizer starts from the same initial weights and
sees the same batches in the same order (and the same dropout masks). Results are aggregated over seeds, and
the verdict says whether the winner's lead is larger than the seed-to-seed spread (paired t-test over seeds;
aggregate.py). The steps: prepare (every check, before any work), run the trials (tuning first when asked),
build the Comparison once from them, save it (save.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from optcli.compare.aggregate import outcome
from optcli.compare.options import CompareOptions
from optcli.compare.results import Comparison, Trial
from optcli.compare.runners import (
    OptimizerSpec,
    ProcessPoolRunner,
    RayRunner,
    SerialRunner,
    TrialCallbacks,
    TrialRunner,
    TrialsInterrupted,
    threads_per_job,
)
from optcli.compare.save import save_comparison
from optcli.compare.stats import Target, parse_target
from optcli.compare.studies import check_storage
from optcli.compare.tuning import Tuned, check_overrides, lr_find_centres, search_space
from optcli.compare.tuning import tune as run_tuning
from optcli.config import Config, OptimizerConfig, check_seed, load_config, optimizer_config, parse_override, to_yaml
from optcli.engine.build import torch_settings
from optcli.engine.loop import EpochMetrics, History
from optcli.engine.optimizers import (
    canonical_name,
    check_kwargs,
    check_optimizer,
    parse_spec,
    resolve_optimizer,
    signature_defaults,
)
from optcli.errors import RunInterrupted, UserError
from optcli.limits import MAX_TRIALS
from optcli.rundir import signals
from optcli.rundir.files import create_run_dir
from optcli.rundir.preflight import preflight
from optcli.rundir.provenance import provenance
from optcli.tasks import load_data
from optcli.tasks.base import lacks_metric
from optcli.tasks.registry import get_task
from optcli.tasks.regression import loss_floor

__all__ = ["Comparison", "Trial", "run_comparison", "prepare", "run_and_save", "parse_specs", "load_compare_config"]


def load_compare_config(path: str | Path | None, overrides: list[str]) -> Config:
    """The config of a comparison: the specs name the optimizers, so `--set optimizer.name` is refused (a name in
    the config file is the one `train` would use, and is replaced by the specs)."""
    for item in overrides:
        if parse_override(item)[0] == ["optimizer", "name"]:
            raise UserError(
                f"--set {item}: compare takes its optimizers from the command line (optcli compare sgd adam ...); "
                f"optimizer.name applies to train only"
            )
    return load_config(path, overrides)


def shared_settings(shared: OptimizerConfig, classes: dict[str, type]) -> dict[str, dict[str, Any]]:
    """The config's optimizer keywords (file or --set) as defaults for every spec whose optimizer takes them
    (spec label -> keywords); a keyword no optimizer of the comparison takes is an error."""
    takes = {label: signature_defaults(cls) for label, cls in classes.items()}
    for key in shared.kwargs:
        if not any(key in sig for sig in takes.values()):
            names = ", ".join(dict.fromkeys(cls.__name__ for cls in classes.values()))
            raise UserError(f"optimizer.{key}: no optimizer of this comparison takes it ({names})")
    return {label: {k: v for k, v in shared.kwargs.items() if k in takes[label]} for label in classes}


def parse_specs(texts: list[str], *, shared: OptimizerConfig | None = None) -> list[OptimizerSpec]:
    """Optimizer specs checked in full (name, keywords, values) before any training; each gets a distinct label.
    `shared` (the config's optimizer section) gives defaults that a spec's own keywords override, and
    parameter groups that apply to every spec."""
    if not texts:
        raise UserError("compare: name at least one optimizer, e.g. optcli compare sgd adam")
    parsed = [(text, *parse_spec(text)) for text in texts]
    classes = {
        str(i): resolve_optimizer(name, where=f"optimizer spec '{text}'") for i, (text, name, _) in enumerate(parsed)
    }
    defaults = shared_settings(shared, classes) if shared is not None else {}
    groups = [g.model_dump() for g in shared.groups] if shared is not None else []
    specs = []
    for i, (text, _, own) in enumerate(parsed):
        cls = classes[str(i)]
        own = check_kwargs(f"optimizer spec '{text}'", cls, own)
        kwargs = {**defaults.get(str(i), {}), **own}
        spec_cfg = optimizer_config(canonical_name(cls), {**kwargs, "groups": groups}, f"optimizer spec '{text}'")
        try:
            check_optimizer(spec_cfg)
        except UserError as exc:
            raise UserError(f"optimizer spec '{text}': {str(exc).removeprefix('optimizer: ')}") from None
        label = text.strip().lower() if own else cls.__name__.lower()
        specs.append(OptimizerSpec(label, spec_cfg.name, spec_cfg.kwargs, groups))
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.label] = counts.get(spec.label, 0) + 1
        if counts[spec.label] > 1:
            spec.label = f"{spec.label}#{counts[spec.label]}"
    return specs


@dataclass(frozen=True)
class Prepared:
    """A comparison checked in full, before any data is loaded or any file is written."""

    specs: list[OptimizerSpec]
    seeds: list[int]
    target: Target | None
    device: torch.device


def prepare(cfg: Config, spec_texts: list[str], options: CompareOptions, *, target: str | None) -> Prepared:
    """Every check of a comparison on one task: the specs, the seeds, the target, the tuning (its spaces and
    storage), the preflight every command makes and whether the data is there."""
    specs = parse_specs(spec_texts, shared=cfg.optimizer)
    check_trials(len(specs), options)
    check_seed(cfg.seed + options.seeds - 1, f"--seeds {options.seeds} from seed {cfg.seed}: the last seed")
    goal = check_target(cfg, target) if target is not None else None
    if options.tuning:
        check_tuning(cfg, specs, options)
    device = preflight(cfg, optimizers={f"optimizer spec '{s.label}'": resolve_optimizer(s.name) for s in specs})
    return Prepared(specs, [cfg.seed + i for i in range(options.seeds)], goal, device)


def check_trials(n_specs: int, options: CompareOptions) -> None:
    """At most MAX_TRIALS trials in one comparison (limits.py): every one is a record in summary.json."""
    budget = options.tune_budget if options.tuning else 0
    trials = n_specs * (options.seeds + budget)
    if trials > MAX_TRIALS:
        asked = f"{n_specs} optimizer(s) x ({options.seeds} seeds" + (f" + {budget} tuning trials)" if budget else ")")
        flag = "--seeds" if options.seeds * n_specs > MAX_TRIALS or not budget else "--seeds/--tune-budget"
        raise UserError(
            f"{flag}: {asked} = {trials} trials, over the limit of {MAX_TRIALS} per comparison "
            "(each is a record in summary.json); run fewer, or several comparisons"
        )


def check_tuning(cfg: Config, specs: list[OptimizerSpec], options: CompareOptions) -> None:
    """Tuning is judged on validation loss, over search spaces and in a storage checked before any training."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError(f"{options.tune_flag} needs optcli[tune]: pip install 'optcli[tune]'") from None
    task = get_task(cfg.data)
    if "val_loss" not in task.metrics:
        if cfg.data.val_fraction == 0:
            raise UserError(f"{options.tune_flag}: needs a validation split; set data.val_fraction > 0")
        raise UserError(f"{options.tune_flag}: judges trials on val_loss; {lacks_metric(task, 'val_loss')}")
    for spec in specs:  # the whole space or the lr alone
        search_space(spec, overrides=cfg.tuning.spaces, lr_only=not options.tune)
    check_overrides(specs, cfg.tuning.spaces)
    check_storage(options.tune_storage)


def run_comparison(
    cfg: Config,
    spec_texts: list[str],
    options: CompareOptions | None = None,
    *,
    on_plan: Callable[[int], None] | None = None,
    callbacks: TrialCallbacks | None = None,
) -> Comparison:
    """Every optimizer x seed, from the same initial weights and batches per seed; files under runs/compare-*/.
    With options.jobs > 1 the trials run in separate processes (runners.ProcessPoolRunner). options.threads is
    torch's thread count per trial (default: all cores serially, cores // jobs in parallel); with equal thread
    counts serial and parallel runs give bit-identical results, since torch splits parallel sums by thread.
    options.vectorize stacks the seeds of each optimizer into one model where that is exact (stacked_runner.py);
    backend "ray" runs every trial as a Ray task (runners.RayRunner). tune_centre "lr-find" centres each
    optimizer's lr range on its lr-find suggestion (tuning.lr_find_centres)."""
    started = time.perf_counter()
    options = options or CompareOptions()
    prepared = prepare(cfg, spec_texts, options, target=options.task_targets(1)[0])
    comparison = run_and_save(cfg, prepared, options, on_plan=on_plan, callbacks=callbacks, started=started)
    raise_if_interrupted(comparison)  # after saving: a stop signal leaves what finished, status interrupted
    return comparison


@dataclass(frozen=True)
class Ran:
    """What running a comparison's trials gave, before the Comparison is built from it."""

    specs: list[OptimizerSpec]  # with their tuned settings when tuned
    trials: list[Trial]
    tuned: Tuned | None
    notes: list[str]  # one line per choice the runner made
    stopped: int | None  # the signal that ended the trials early: the unfinished ones are marked interrupted
    run_dir: Path | None  # made for a tuning study; None: made when the comparison is saved


def run_and_save(
    cfg: Config,
    prepared: Prepared,
    options: CompareOptions,
    *,
    on_plan: Callable[[int], None] | None = None,
    callbacks: TrialCallbacks | None = None,
    started: float | None = None,
) -> Comparison:
    """The trials of a prepared comparison (tuning first when asked), the Comparison built from them, saved; its
    status says whether a stop signal ended it (what finished is kept, the rest marked interrupted)."""
    started = time.perf_counter() if started is None else started
    if on_plan:
        on_plan(len(prepared.specs) * (len(prepared.seeds) + (options.tune_budget if options.tuning else 0)))
    with signals.stop_on_signals(), torch_settings(cfg, threads=options.threads if options.jobs == 1 else None):
        ran = run_trials(cfg, prepared, options, callbacks=callbacks)
        return save_comparison(cfg, build(cfg, prepared, options, ran, started=started), run_dir=ran.run_dir)


def raise_if_interrupted(comparison: Comparison) -> None:
    """RunInterrupted for a comparison a stop signal ended, saying what finished and where it is saved."""
    if comparison.interrupted_by is None:
        return
    trials = comparison.trials
    finished = sum(t.history.status != "interrupted" for t in trials)
    saved = f"{finished} of {len(trials)} trials finished, saved in {comparison.run_dir} (the others marked so)"
    if comparison.tuning is not None and comparison.tuning.get("status") == "interrupted":
        rows = [r for t in comparison.tuning["optimizers"].values() for r in t["trials"]]
        saved = (
            f"tuning stopped after {len(rows)} finished tuning trials (kept in the study; the interrupted ones "
            f"are marked failed and run again by the same command); {saved}"
        )
    signum = signal.Signals[comparison.interrupted_by]
    raise RunInterrupted(comparison.run_dir, signum, saved=saved, warnings=comparison.warnings)


def run_trials(
    cfg: Config,
    prepared: Prepared,
    options: CompareOptions,
    *,
    callbacks: TrialCallbacks | None,
) -> Ran:
    """Tuning (when asked) and then every (optimizer, seed) trial, through one runner. The runner is started (its
    data loaded, in this process or its workers) before a tuning study's run directory is made, so that data that
    is not there is one line and nothing on disk. A stop signal at any point keeps the finished trials and marks
    the others interrupted (all of them when tuning or starting was cut)."""
    specs, seeds, stopped = prepared.specs, prepared.seeds, None
    tuned, histories, notes, run_dir = None, None, [], None
    try:
        with make_runner(cfg, options, device=prepared.device, callbacks=callbacks) as runner:
            if options.tuning:  # the study's home; otherwise the directory is made when the comparison is saved
                run_dir = create_run_dir(cfg.out_dir, cfg.name, prefix="compare-")
            tuned = tune_first(cfg, specs, options, seed=seeds[0], runner=runner, run_dir=run_dir)
            specs, stopped = (tuned.specs, tuned.stopped) if tuned is not None else (specs, None)
            if stopped is None:
                try:
                    histories = runner.run([(spec, seed) for seed in seeds for spec in specs])
                except TrialsInterrupted as exc:  # the finished trials are kept, the others marked interrupted
                    histories, stopped = exc.histories, exc.signum
            notes = list(getattr(runner, "notes", []))
    except KeyboardInterrupt as exc:  # while starting or closing the runner, or centring the lr ranges
        stopped = signals.signum_of(exc)
    plan = [(spec, seed) for seed in seeds for spec in specs]
    histories = histories or [History(status="interrupted") for _ in plan]
    trials = [Trial(spec.label, seed, h) for (spec, seed), h in zip(plan, histories, strict=True)]
    return Ran(specs, trials, tuned, notes, stopped, run_dir)


def tune_first(
    cfg: Config,
    specs: list[OptimizerSpec],
    options: CompareOptions,
    *,
    seed: int,
    runner: TrialRunner,
    run_dir: Path | None,
) -> Tuned | None:
    """--tune / --tune-lr on the first seed, through the comparison's runner; None without them."""
    if not options.tuning:
        return None
    return run_tuning(
        specs,
        options=options,
        seed=seed,
        runner=runner,
        task=to_yaml(cfg.model_copy(update={"name": None})),
        run_dir=run_dir,
        overrides=cfg.tuning.spaces,
        lr_find=lr_find_centres(cfg, specs, seed=seed) if options.tune_centre == "lr-find" else None,
    )


def build(cfg: Config, prepared: Prepared, options: CompareOptions, ran: Ran, *, started: float) -> Comparison:
    """The Comparison, built once from the trials: tables, verdicts, curves, and how it ran."""
    seeds, floor = prepared.seeds, loss_floor(cfg.data, cfg.train.reduction)
    out = outcome(ran.specs, ran.trials, seeds=seeds, epochs=cfg.train.epochs, target=prepared.target, floor=floor)
    histories = (ran.tuned.histories if ran.tuned else []) + [t.history for t in ran.trials]
    return Comparison(
        specs=ran.specs,
        seeds=seeds,
        epochs=cfg.train.epochs,
        task=_task(cfg),
        trials=ran.trials,
        rows=out.rows,
        verdicts=out.verdicts,
        curves=out.curves,
        tuning=ran.tuned.record if ran.tuned else None,
        jobs=options.jobs,
        epoch_seconds=sum(e.seconds for h in histories for e in h.epochs),
        target=prepared.target.to_dict() if prepared.target is not None else None,
        loss_floor=floor,
        provenance=run_provenance(options, ran.specs, prepared.device),
        notes=ran.notes,
        function=get_task(cfg.data).describe_comparison(seeds, ran.trials) if ran.stopped is None else None,
        status=ending(ran),
        interrupted_by=signal.Signals(ran.stopped).name if ran.stopped is not None else None,
        wall_seconds=time.perf_counter() - started,
        warnings=list(ran.tuned.warnings) if ran.tuned else [],  # tuning trials left running by a dead process
    )


def ending(ran: Ran) -> str:
    """interrupted (a stop signal), failed (every trial raised an error: nothing to compare), partly_failed (some
    did), or completed. A diverged trial is a result, not a failure."""
    if ran.stopped is not None:
        return "interrupted"
    failed = sum(t.history.status == "failed" for t in ran.trials)
    return "completed" if not failed else "failed" if failed == len(ran.trials) else "partly_failed"


def run_provenance(options: CompareOptions, specs: list[OptimizerSpec], device: torch.device) -> dict:
    """Software and settings the trials ran with; called under the comparison's torch settings."""
    jobs = options.jobs
    return provenance(
        device=device,
        threads=options.threads or (torch.get_num_threads() if jobs == 1 else threads_per_job(jobs)),
        jobs=jobs,
        optimizer_classes=[resolve_optimizer(s.name) for s in specs],
    )


def make_runner(
    cfg: Config, options: CompareOptions, *, device: torch.device, callbacks: TrialCallbacks | None
) -> TrialRunner:
    if options.backend == "ray":
        return RayRunner(cfg, threads=options.threads, callbacks=callbacks)
    if options.vectorize:
        from optcli.compare.stacked_runner import StackedRunner

        return StackedRunner(cfg, load_data(cfg.data, device), callbacks)
    if options.jobs > 1:
        return ProcessPoolRunner(cfg, jobs=options.jobs, threads=options.threads, callbacks=callbacks, device=device)
    return SerialRunner(cfg, load_data(cfg.data, device), callbacks)  # the data is loaded once for every trial


def check_target(cfg: Config, text: str) -> Target:
    """--target parsed, and refused when no epoch's evaluation can hold its metric."""
    task = get_task(cfg.data)
    metrics = [f.name for f in fields(EpochMetrics) if f.name.endswith(("loss", "accuracy", "r2"))]
    target = parse_target(text, metrics)
    if target.metric.startswith("val_") and cfg.data.val_fraction == 0:
        raise UserError(f"--target {text}: {target.metric} needs a validation split; set data.val_fraction > 0")
    if target.metric not in task.metrics:
        hint = "; try val_loss" if "val_loss" in task.metrics else ""
        raise UserError(f"--target {text}: {lacks_metric(task, target.metric)}{hint}")
    return target


def _task(cfg: Config) -> str:
    return get_task(cfg.data).kind.value
