"""A fair comparison of optimizers: for each seed, every optimizer starts from the same initial weights and
sees the same batches in the same order (and the same dropout masks). Results are aggregated over seeds, and
the verdict says whether the winner's lead is larger than the seed-to-seed spread (paired t-test over seeds).
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

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
from optcli.compare.stats import Target, mean_std, paired_verdict, parse_target, time_to_target
from optcli.compare.tuning import check_overrides, lr_find_centres, search_space, tuning_rows
from optcli.compare.tuning import tune as run_tuning
from optcli.config import (
    Config,
    DataConfig,
    OptimizerConfig,
    load_config,
    optimizer_config,
    parse_override,
    to_yaml,
)
from optcli.engine.build import torch_settings
from optcli.engine.loop import EpochMetrics, History, check_closure_settings, check_precision
from optcli.engine.model import check_model_config, resolve_device
from optcli.engine.optimizers import (
    canonical_name,
    check_kwargs,
    check_optimizer,
    check_scheduler,
    needs_closure,
    parse_spec,
    resolve_optimizer,
    signature_defaults,
)
from optcli.errors import RunInterrupted, UserError
from optcli.rundir import signals
from optcli.rundir.files import RunLock, atomic_write_text, create_run_dir, write_csv, write_json
from optcli.rundir.loggers import TENSORBOARD_DIR, check_loggers, trial_dir_name, write_history
from optcli.rundir.provenance import provenance
from optcli.rundir.schema import FORMAT_VERSION
from optcli.tasks import load_data
from optcli.tasks.base import lacks_metric
from optcli.tasks.functions import grid
from optcli.tasks.registry import get_task
from optcli.tasks.regression import loss_floor

# (key, label, lower is better)
METRICS = [
    ("final_train_loss", "final train loss", True),
    ("best_val_loss", "best val loss", True),
    ("val_accuracy", "val accuracy", False),
    ("test_accuracy", "test accuracy", False),
    ("val_r2", "val R²", False),
]


@dataclass
class Trial:
    label: str
    seed: int
    history: History
    lr: float | None = None  # the learning rate tried, for tuning trials


@dataclass
class Comparison:
    specs: list[OptimizerSpec]
    seeds: list[int]
    epochs: int
    task: str
    trials: list[Trial]
    rows: list[dict]  # one per optimizer: mean and std over seeds of every metric
    verdicts: list[dict]
    curves: dict[str, dict[str, list]]  # label -> {"train": [(mean, std)...], "val": [...]} per epoch
    tuning: dict | None = None
    run_dir: str | None = None
    wall_seconds: float = 0.0
    epoch_seconds: float = 0.0  # time inside training epochs, summed over trials
    jobs: int = 1
    notes: list[str] = field(default_factory=list)  # one line per choice the runner made (vectorize fallbacks)
    function: dict | None = None  # 2-D test functions: name, minimum, start per seed, plot box, data config
    status: str = "completed"  # or interrupted: a stop signal ended it, unfinished trials are marked interrupted
    interrupted_by: str | None = None  # the signal's name
    target: dict | None = None  # {"metric", "value", "higher_is_better"} of --target
    loss_floor: float | None = None  # the best achievable validation loss of the task, when known
    provenance: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trials"] = [{"label": t.label, "seed": t.seed, "lr": t.lr, **t.history.to_dict()} for t in self.trials]
        return d


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
    classes = {str(i): resolve_optimizer(name) for i, (_, name, _) in enumerate(parsed)}
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
        "state_bytes": last.dynamics["state_bytes"] if last and last.dynamics else None,
        "final_value": last.position["value"] if last and last.position else None,
        "distance_to_min": last.position["distance"] if last and last.position else None,
    }


TARGET_KEYS = ("target_epoch", "target_steps", "target_seconds")


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
        extra = ["epochs_to_best", "seconds_per_epoch", "state_bytes", "final_value", "distance_to_min"]
        for key in [m[0] for m in METRICS] + extra:
            values = [v for t in done if (v := trial_metrics(t.history)[key]) is not None]
            row[key], row[key + "_std"] = mean_std(values)
        if floor is not None and row["best_val_loss"] is not None:
            row["excess_val_loss"] = row["best_val_loss"] - floor
        if target is not None:
            reached = [m for t in mine if (m := trial_metrics(t.history, target))["target_steps"] is not None]
            row["target_reached"] = len(reached)
            for key in TARGET_KEYS:
                row[key], row[key + "_std"] = mean_std([float(v) for m in reached if (v := m[key]) is not None])
        diverged = [t for t in mine if t.history.status == "diverged"]
        failed = [t for t in mine if t.history.status == "failed"]
        early = [t for t in mine if t.history.status == "stopped_early"]
        kinds = (("diverged", diverged), ("failed", failed), ("stopped early", early))
        row["status"] = ", ".join(f"{kind} {len(ts)}/{len(mine)}" for kind, ts in kinds if ts) or "completed"
        row["failed"] = [{"seed": t.seed, "error": t.history.error} for t in failed]
        row["diverged_at"] = [{"seed": t.seed, **(t.history.diverged_at or {})} for t in diverged]
        rows.append(row)
    return rows


def verdict(
    metric: str,
    name: str,
    lower_better: bool,
    specs: list[OptimizerSpec],
    trials: list[Trial],
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
    """Per optimizer and epoch: [mean, std, min, max] over the seeds that reached it with a finite loss."""
    out: dict[str, dict[str, list]] = {}
    for spec in specs:
        mine = [t.history.epochs for t in trials if t.label == spec.label]
        out[spec.label] = {}
        for kind in ("train_loss", "val_loss"):
            points = []
            for e in range(epochs):
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
    out = verdict("target_steps", name, True, specs, trials, seeds, target)
    if out is None:
        return {"metric": "target_steps", "name": name, "best": None, "reached": counts, "text": f"reached by {reach}"}
    return {**out, "reached": counts, "text": f"{out['text']}; reached by {reach}"}


def run_comparison(
    cfg: Config,
    spec_texts: list[str],
    *,
    seeds: int = 3,
    tune: bool = False,
    target: str | None = None,
    tune_lr: bool = False,
    tune_budget: int = 5,
    tune_storage: str | None = None,
    tune_centre: str = "spec",
    jobs: int = 1,
    threads: int | None = None,
    vectorize: bool = False,
    backend: str = "local",
    on_plan: Callable[[int], None] | None = None,
    callbacks: TrialCallbacks | None = None,
) -> Comparison:
    """Every optimizer x seed, from the same initial weights and batches per seed; files under runs/compare-*/.
    With jobs > 1 the trials run in separate processes (trials.ProcessPoolRunner). `threads` is torch's thread
    count per trial (default: all cores serially, cores // jobs in parallel); with equal thread counts serial and
    parallel runs give bit-identical results, since torch splits parallel sums by thread. `vectorize` stacks the
    seeds of each optimizer into one model where that is exact (vectorized.py); backend "ray" runs every trial as
    a Ray task (trials.RayRunner). `tune_centre` "lr-find" centres each optimizer's lr range on its lr-find
    suggestion (tuning.lr_find_centres)."""
    started = time.perf_counter()
    for flag, value in (("--seeds", seeds), ("--tune-budget", tune_budget), ("--jobs", jobs), ("--threads", threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1 (got {value})")
    specs = parse_specs(spec_texts, shared=cfg.optimizer)
    for spec in specs:
        check_closure_settings(resolve_optimizer(spec.name), cfg.train.accumulate, f"optimizer spec '{spec.label}'")
    goal = check_target(cfg, target) if target is not None else None
    check_model_config(cfg)
    check_scheduler(cfg.scheduler, cfg.train.epochs)
    check_runner_options(jobs=jobs, vectorize=vectorize, backend=backend)
    check_loggers(cfg)
    tuning_on = tune or tune_lr
    flag = "--tune" if tune else "--tune-lr"
    if tuning_on and cfg.data.val_fraction == 0:
        raise UserError(f"{flag}: needs a validation split; set data.val_fraction > 0")
    if tune_storage is not None and not tuning_on:
        raise UserError("--tune-storage: only with --tune or --tune-lr")
    if tune_centre not in ("spec", "lr-find"):
        raise UserError(f"--tune-centre: must be spec or lr-find (got {tune_centre!r})")
    if tune_centre == "lr-find" and not tuning_on:
        raise UserError("--tune-centre lr-find: only with --tune or --tune-lr")
    if tuning_on:  # the whole space or the lr alone, checked before any training
        for spec in specs:
            search_space(spec, overrides=cfg.tuning.spaces, lr_only=not tune)
        check_overrides(specs, cfg.tuning.spaces)
    device = resolve_device(cfg.device)
    uses_closure = any(needs_closure(resolve_optimizer(spec.name)) for spec in specs)
    check_precision(cfg.train.precision, device, uses_closure=uses_closure)
    seed_list = [cfg.seed + i for i in range(seeds)]
    run_dir = create_run_dir(cfg.out_dir, cfg.name, prefix="compare-") if tuning_on else None  # the study's home
    if on_plan:
        on_plan(len(specs) * (len(seed_list) + (tune_budget if tuning_on else 0)))
    stopped: int | None = None
    notes: list[str] = []
    with (
        signals.stop_on_signals(),
        torch_settings(cfg, threads=threads if jobs == 1 else None),
    ):
        try:
            with make_runner(
                cfg,
                device=device,
                jobs=jobs,
                threads=threads,
                vectorize=vectorize,
                backend=backend,
                callbacks=callbacks,
            ) as runner:
                tuning, tune_histories = (
                    run_tuning(
                        specs,
                        budget=tune_budget,
                        seed=seed_list[0],
                        runner=runner,
                        task=to_yaml(cfg.model_copy(update={"name": None})),
                        storage_url=tune_storage,
                        run_dir=run_dir,
                        overrides=cfg.tuning.spaces,
                        lr_only=not tune,
                        lr_find=lr_find_centres(cfg, specs, seed=seed_list[0]) if tune_centre == "lr-find" else None,
                    )
                    if tuning_on
                    else (None, [])
                )
                plan = [(spec, seed) for seed in seed_list for spec in specs]
                try:
                    histories = runner.run(plan)
                except TrialsInterrupted as exc:  # the finished trials are kept, the others marked interrupted
                    histories, stopped = exc.histories, exc.signum
                trials = [Trial(spec.label, seed, h) for (spec, seed), h in zip(plan, histories, strict=True)]
                notes = list(getattr(runner, "notes", []))
        except (TrialsInterrupted, KeyboardInterrupt) as exc:  # while tuning or starting: no comparison to save
            raise RunInterrupted(None, getattr(exc, "signum", None) or signals.signum_of(exc)) from None
        comparison = build_comparison(
            specs,
            seeds=seed_list,
            epochs=cfg.train.epochs,
            task=_task(cfg),
            trials=trials,
            tuning=tuning,
            jobs=jobs,
            epoch_seconds=sum(e.seconds for h in tune_histories + [t.history for t in trials] for e in h.epochs),
            target=goal,
            floor=loss_floor(cfg.data, cfg.train.reduction),
        )
        comparison.provenance = provenance(
            device=device,
            threads=threads or (torch.get_num_threads() if jobs == 1 else threads_per_job(jobs)),
            jobs=jobs,
            optimizer_classes=[resolve_optimizer(s.name) for s in specs],
        )
        comparison.notes = notes
        if stopped is None:
            comparison.function = get_task(cfg.data).describe_comparison(seed_list, trials)
        comparison.wall_seconds = time.perf_counter() - started
        if stopped is not None:
            comparison.status, comparison.interrupted_by = "interrupted", signal.Signals(stopped).name
        save_comparison(cfg, comparison, run_dir=run_dir)
    if stopped is not None:
        finished = sum(t.history.status != "interrupted" for t in trials)
        raise RunInterrupted(
            comparison.run_dir,
            stopped,
            saved=f"{finished} of {len(trials)} trials finished, saved in {comparison.run_dir} (the others marked so)",
        )
    return comparison


def save_comparison(cfg: Config, comparison: Comparison, *, run_dir: Path | None = None) -> None:
    """The comparison's run directory (made here unless tuning made it for its study), written under its lock;
    a stop signal waits until it is whole."""
    run_dir = run_dir or create_run_dir(cfg.out_dir, cfg.name, prefix="compare-")
    comparison.run_dir = str(run_dir)
    with RunLock(run_dir), signals.held():
        write_comparison(comparison_config_yaml(cfg), comparison, run_dir)
        if "tensorboard" in cfg.train.loggers:
            for t in comparison.trials:
                write_history(run_dir / TENSORBOARD_DIR / trial_dir_name(t.label, t.seed), t.history)
        from optcli.report.html import report_after_run  # report.html and results.csv, from the files just saved

        comparison.warnings += [w] if (w := report_after_run(run_dir)) else []


def _task(cfg: Config) -> str:
    return get_task(cfg.data).kind.value


def check_runner_options(*, jobs: int, vectorize: bool, backend: str) -> None:
    if backend not in ("local", "ray"):
        raise UserError(f"--backend: must be local or ray (got {backend!r})")
    if backend == "ray" and jobs > 1:
        raise UserError(
            "--jobs: runs trials on this machine; with --backend ray every trial is a Ray task (drop --jobs)"
        )
    if vectorize and (jobs > 1 or backend == "ray"):
        raise UserError("--vectorize: stacks the seeds in this process; drop --jobs and --backend ray")


def comparison_config_yaml(cfg: Config) -> str:
    """The resolved config without its optimizer section: what each optimizer ran with is in compare.optimizers."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"optimizer"}), sort_keys=False)


def check_target(cfg: Config, text: str) -> Target:
    """--target parsed, and refused when no epoch's evaluation can hold its metric."""
    task = get_task(cfg.data)
    metrics = [f.name for f in fields(EpochMetrics) if f.name.endswith(("loss", "accuracy", "r2"))]
    target = parse_target(text, metrics)
    if target.metric.startswith("val_") and cfg.data.val_fraction == 0:
        raise UserError(f"--target {text}: {target.metric} needs a validation split; set data.val_fraction > 0")
    if target.metric not in task.metrics:
        raise UserError(f"--target {text}: {lacks_metric(task, target.metric)}; try val_loss")
    return target


def make_runner(
    cfg: Config,
    *,
    device,
    jobs: int,
    threads: int | None,
    vectorize: bool = False,
    backend: str = "local",
    callbacks: TrialCallbacks | None,
) -> TrialRunner:
    if backend == "ray":
        return RayRunner(cfg, threads=threads, callbacks=callbacks)
    if vectorize:
        from optcli.engine.stacked import StackedRunner

        return StackedRunner(cfg, load_data(cfg.data, device), callbacks)
    if jobs > 1:
        return ProcessPoolRunner(cfg, jobs=jobs, threads=threads, callbacks=callbacks, device=device)
    return SerialRunner(cfg, load_data(cfg.data, device), callbacks)  # the data is loaded once for every trial


def build_comparison(
    specs: list[OptimizerSpec],
    *,
    seeds: list[int],
    epochs: int,
    task: str,
    trials: list[Trial],
    tuning: dict | None = None,
    jobs: int = 1,
    epoch_seconds: float = 0.0,
    target: Target | None = None,
    floor: float | None = None,
) -> Comparison:
    """Tables, verdicts and curves from the trials: the same whether they ran here or came from several machines."""
    verdicts = [v for key, name, lower in METRICS if (v := verdict(key, name, lower, specs, trials, seeds))]
    if target is not None:
        verdicts.insert(0, target_verdict(specs, trials, seeds, target))
    return Comparison(
        specs,
        seeds,
        epochs,
        task,
        trials,
        aggregate(specs, trials, target, floor),
        verdicts,
        curves(specs, trials, epochs),
        tuning,
        jobs=jobs,
        epoch_seconds=epoch_seconds,
        target=target.to_dict() if target is not None else None,
        loss_floor=floor,
    )


def write_comparison(config_yaml: str, comparison: Comparison, run_dir) -> None:
    atomic_write_text(run_dir / "config.yaml", config_yaml + yaml_specs(comparison))
    target = Target(**comparison.target) if comparison.target else None
    rows = [
        {
            "optimizer": t.label,
            "seed": t.seed,
            **e.csv_row(),
            **({"target_met": target.met(getattr(e, target.metric))} if target else {}),
        }
        for t in comparison.trials
        for e in t.history.epochs
    ]
    write_csv(run_dir / "metrics.csv", rows)
    write_json(run_dir / "summary.json", {"format": FORMAT_VERSION, **comparison.to_dict()})
    from optcli.report.plots import save_dynamics_plot, save_loss_plot  # matplotlib only when a comparison is written

    save_loss_plot(comparison, run_dir / "loss.png")
    if any(e.dynamics for t in comparison.trials for e in t.history.epochs):
        save_dynamics_plot(comparison, run_dir / "dynamics.png")
    if comparison.function is not None:
        from optcli.report.plots import save_trajectory_plot

        f = comparison.function
        save_trajectory_plot(comparison, grid(DataConfig(**f["data"]), f["box"]), run_dir / "trajectories.png")
    if comparison.tuning:
        from optcli.report.tuning import save_tuning_plot

        write_csv(run_dir / "tuning.csv", tuning_rows(comparison.tuning))
        save_tuning_plot(comparison.tuning, run_dir / "tuning.png")


def yaml_specs(comparison: Comparison) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "compare": {
                "optimizers": [
                    {"label": s.label, "name": s.name, **s.kwargs, **({"groups": s.groups} if s.groups else {})}
                    for s in comparison.specs
                ],
                "seeds": comparison.seeds,
            }
        },
        sort_keys=False,
    )
