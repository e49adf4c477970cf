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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optcli import signals
from optcli.build import torch_settings
from optcli.config import Config, DataConfig, optimizer_config, to_yaml
from optcli.errors import RunInterrupted, UserError
from optcli.loggers import TENSORBOARD_DIR, check_loggers, trial_dir_name, write_history
from optcli.model import check_model_config, resolve_device
from optcli.optim import (
    canonical_name,
    check_kwargs,
    check_optimizer,
    check_scheduler,
    parse_spec,
    resolve_optimizer,
)
from optcli.run_files import FORMAT_VERSION
from optcli.runs import RunLock, atomic_write_text, create_run_dir, write_csv, write_json
from optcli.stats import mean_std, paired_verdict
from optcli.tasks import load_data
from optcli.tasks.functions import FUNCTIONS, grid, plot_box, start_point
from optcli.train import History
from optcli.trials import (
    OptimizerSpec,
    ProcessPoolRunner,
    RayRunner,
    SerialRunner,
    TrialCallbacks,
    TrialRunner,
    TrialsInterrupted,
)
from optcli.tuning import check_overrides, search_space, tuning_rows
from optcli.tuning import tune as run_tuning

# (key, label, lower is better)
METRICS = [
    ("final_train_loss", "final train loss", True),
    ("best_val_loss", "best val loss", True),
    ("val_accuracy", "val accuracy", False),
    ("test_accuracy", "test accuracy", False),
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trials"] = [{"label": t.label, "seed": t.seed, "lr": t.lr, **t.history.to_dict()} for t in self.trials]
        return d


def parse_specs(texts: list[str]) -> list[OptimizerSpec]:
    """Optimizer specs checked in full (name, keywords, values) before any training; each gets a distinct label."""
    if not texts:
        raise UserError("compare: name at least one optimizer, e.g. optcli compare sgd adam")
    specs = []
    for text in texts:
        name, kwargs = parse_spec(text)
        cls = resolve_optimizer(name, f"optimizer spec '{text}'")
        kwargs = check_kwargs(f"optimizer spec '{text}'", cls, kwargs)
        spec_cfg = optimizer_config(canonical_name(cls), kwargs, f"optimizer spec '{text}'")
        try:
            check_optimizer(spec_cfg)
        except UserError as exc:
            raise UserError(f"optimizer spec '{text}': {str(exc).removeprefix('optimizer: ')}") from None
        specs.append(OptimizerSpec(text.strip().lower() if kwargs else cls.__name__.lower(), spec_cfg.name, kwargs))
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.label] = counts.get(spec.label, 0) + 1
        if counts[spec.label] > 1:
            spec.label = f"{spec.label}#{counts[spec.label]}"
    return specs


def trial_metrics(history: History) -> dict[str, float | None]:
    best = history.best()
    last = history.epochs[-1] if history.epochs else None
    return {
        "final_train_loss": last.train_loss if last else None,
        "best_val_loss": best.val_loss if best else None,
        "val_accuracy": best.val_accuracy if best else None,
        "test_accuracy": history.test_accuracy,
        "epochs_to_best": best.epoch if best else None,
        "seconds_per_epoch": statistics.fmean(e.seconds for e in history.epochs) if history.epochs else None,
        "state_bytes": last.dynamics["state_bytes"] if last and last.dynamics else None,
        "final_value": last.position["value"] if last and last.position else None,
        "distance_to_min": last.position["distance"] if last and last.position else None,
    }


def aggregate(specs: list[OptimizerSpec], trials: list[Trial]) -> list[dict]:
    rows = []
    for spec in specs:
        mine = [t for t in trials if t.label == spec.label]
        done = [t for t in mine if t.history.status == "completed"]
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
        diverged = [t for t in mine if t.history.status == "diverged"]
        failed = [t for t in mine if t.history.status == "failed"]
        parts = [f"{kind} {len(ts)}/{len(mine)}" for kind, ts in (("diverged", diverged), ("failed", failed)) if ts]
        row["status"] = ", ".join(parts) or "completed"
        row["failed"] = [{"seed": t.seed, "error": t.history.error} for t in failed]
        row["diverged_at"] = [{"seed": t.seed, **(t.history.diverged_at or {})} for t in diverged]
        rows.append(row)
    return rows


def verdict(
    metric: str, name: str, lower_better: bool, specs: list[OptimizerSpec], trials: list[Trial], seeds: list[int]
) -> dict | None:
    """The best optimizer on one metric, and whether its lead over the runner-up beats the seed-to-seed spread."""
    per_label: dict[str, dict[int, float]] = {}
    for t in trials:
        value = trial_metrics(t.history)[metric] if t.history.status == "completed" else None
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


def run_comparison(
    cfg: Config,
    spec_texts: list[str],
    *,
    seeds: int = 1,
    tune: bool = False,
    tune_lr: bool = False,
    tune_budget: int = 5,
    tune_storage: str | None = None,
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
    a Ray task (trials.RayRunner)."""
    started = time.perf_counter()
    for flag, value in (("--seeds", seeds), ("--tune-budget", tune_budget), ("--jobs", jobs), ("--threads", threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1 (got {value})")
    specs = parse_specs(spec_texts)
    check_model_config(cfg.model)
    check_scheduler(cfg.scheduler, cfg.train.epochs)
    check_runner_options(jobs=jobs, vectorize=vectorize, backend=backend)
    check_loggers(cfg)
    tuning_on = tune or tune_lr
    flag = "--tune" if tune else "--tune-lr"
    if tuning_on and cfg.data.val_fraction == 0:
        raise UserError(f"{flag}: needs a validation split; set data.val_fraction > 0")
    if tune_storage is not None and not tuning_on:
        raise UserError("--tune-storage: only with --tune or --tune-lr")
    if tuning_on:  # the whole space or the lr alone, checked before any training
        for spec in specs:
            search_space(spec, overrides=cfg.tuning.spaces, lr_only=not tune)
        check_overrides(specs, cfg.tuning.spaces)
    device = resolve_device(cfg.device)
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
        )
        comparison.notes = notes
        if cfg.data.name == "function" and stopped is None:
            comparison.function = describe_function(cfg.data, seed_list, trials)
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
        write_comparison(to_yaml(cfg), comparison, run_dir)
        if "tensorboard" in cfg.train.loggers:
            for t in comparison.trials:
                write_history(run_dir / TENSORBOARD_DIR / trial_dir_name(t.label, t.seed), t.history)


def _task(cfg: Config) -> str:
    return {"mnist": "classification", "function": "function"}.get(cfg.data.name, "regression")


def check_runner_options(*, jobs: int, vectorize: bool, backend: str) -> None:
    if backend not in ("local", "ray"):
        raise UserError(f"--backend: must be local or ray (got {backend!r})")
    if backend == "ray" and jobs > 1:
        raise UserError(
            "--jobs: runs trials on this machine; with --backend ray every trial is a Ray task (drop --jobs)"
        )
    if vectorize and (jobs > 1 or backend == "ray"):
        raise UserError("--vectorize: stacks the seeds in this process; drop --jobs and --backend ray")


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
        from optcli.vectorized import StackedRunner

        return StackedRunner(cfg, load_data(cfg.data, device), callbacks)
    if jobs > 1:
        return ProcessPoolRunner(cfg, jobs=jobs, threads=threads, callbacks=callbacks)
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
) -> Comparison:
    """Tables, verdicts and curves from the trials: the same whether they ran here or came from several machines."""
    verdicts = [v for key, name, lower in METRICS if (v := verdict(key, name, lower, specs, trials, seeds))]
    return Comparison(
        specs,
        seeds,
        epochs,
        task,
        trials,
        aggregate(specs, trials),
        verdicts,
        curves(specs, trials, epochs),
        tuning,
        jobs=jobs,
        epoch_seconds=epoch_seconds,
    )


def write_comparison(config_yaml: str, comparison: Comparison, run_dir) -> None:
    atomic_write_text(run_dir / "config.yaml", config_yaml + yaml_specs(comparison))
    rows = [{"optimizer": t.label, "seed": t.seed, **e.csv_row()} for t in comparison.trials for e in t.history.epochs]
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


def describe_function(cfg: DataConfig, seeds: list[int], trials: list[Trial]) -> dict:
    """What the trajectory plot needs besides the trials: the function, its minimum, each seed's start, a box."""
    known = FUNCTIONS[cfg.function]
    starts = {seed: start_point(cfg, seed) for seed in seeds}
    points = list(starts.values()) + [
        [e.position["x"], e.position["y"]] for t in trials for e in t.history.epochs if e.position
    ]
    return {
        "name": cfg.function,
        "minimum": list(known.minimum),
        "starts": starts,
        "box": plot_box(known.box, points),
        "data": cfg.model_dump(mode="json"),
    }


def yaml_specs(comparison: Comparison) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "compare": {
                "optimizers": [{"label": s.label, "name": s.name, **s.kwargs} for s in comparison.specs],
                "seeds": comparison.seeds,
            }
        },
        sort_keys=False,
    )
