"""A comparison's run directory: config.yaml (the resolved config and the specs that ran), metrics.csv (one row per
trial and epoch), summary.json, the plots, and the tuning record when there is one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from optcli.compare.results import Comparison
from optcli.compare.stats import Target
from optcli.compare.tuning import tuning_rows
from optcli.config import Config, DataConfig
from optcli.rundir import signals
from optcli.rundir.files import RunLock, atomic_write_text, create_run_dir, write_csv, write_json
from optcli.rundir.loggers import TENSORBOARD_DIR, trial_dir_name, write_history
from optcli.rundir.schema import FORMAT_VERSION
from optcli.tasks.functions import grid


def save_comparison(cfg: Config, comparison: Comparison, *, run_dir: Path | None = None) -> Comparison:
    """The comparison's run directory (made here unless tuning made it for its study), written under its lock;
        a stop signal waits until it is whole; then its report.html. Returns the comparison with its run_dir (and a
    warning when the report could not be built)."""
    run_dir = run_dir or create_run_dir(cfg.out_dir, cfg.name, prefix="compare-")
    comparison = dataclasses.replace(comparison, run_dir=str(run_dir))
    with RunLock(run_dir), signals.held():
        if warnings := write_comparison(comparison_config_yaml(cfg), comparison, run_dir):
            comparison = dataclasses.replace(comparison, warnings=[*comparison.warnings, *warnings])
        if "tensorboard" in cfg.train.loggers:
            for t in comparison.trials:
                write_history(run_dir / TENSORBOARD_DIR / trial_dir_name(t.label, t.seed), t.history)
        from optcli.report.html import report_after_run  # report.html and results.csv, from the files just saved

        if warning := report_after_run(run_dir):
            comparison = dataclasses.replace(comparison, warnings=[*comparison.warnings, warning])
            write_summary(run_dir, comparison)
    return comparison


def comparison_config_yaml(cfg: Config) -> str:
    """The resolved config without its optimizer section: what each optimizer ran with is in compare.optimizers."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"optimizer"}), sort_keys=False)


def write_summary(run_dir: Path, comparison: Comparison) -> None:
    write_json(run_dir / "summary.json", {"format": FORMAT_VERSION, **comparison.to_dict()})


def write_comparison(config_yaml: str, comparison: Comparison, run_dir: Path) -> list[str]:
    """The files, then the figures: a figure that cannot be drawn is a warning line (returned, and in summary.json's
    warnings), not a failure."""
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
    write_summary(run_dir, comparison)  # before the figures: whatever happens to them, the run has its status
    from optcli.report.plots import drawn, save_dynamics_plot, save_loss_plot  # matplotlib only when written

    figures = [("loss.png", lambda p: save_loss_plot(comparison, p))]
    if any(e.dynamics for t in comparison.trials for e in t.history.epochs):
        figures.append(("dynamics.png", lambda p: save_dynamics_plot(comparison, p)))
    if comparison.function is not None:
        from optcli.report.plots import save_trajectory_plot

        f = comparison.function
        box = lambda: grid(DataConfig(**f["data"]), f["box"])  # noqa: E731 the function over the plot's box
        figures.append(("trajectories.png", lambda p: save_trajectory_plot(comparison, box(), p)))
    if comparison.tuning:
        from optcli.report.tuning import save_tuning_plot

        write_csv(run_dir / "tuning.csv", tuning_rows(comparison.tuning))
        tuning = comparison.tuning
        figures.append(("tuning.png", lambda p: save_tuning_plot(tuning, p)))
    warnings = [w for name, draw in figures if (w := drawn(run_dir / name, draw))]
    if warnings:
        write_summary(run_dir, dataclasses.replace(comparison, warnings=[*comparison.warnings, *warnings]))
    return warnings


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
