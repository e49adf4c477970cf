"""Merge comparisons run apart (other machines, other seeds) into one: the trials in each summary.json carry
their optimizer label, seed and full per-epoch history, so the tables and the verdict are rebuilt from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from optcli.compare.aggregate import outcome
from optcli.compare.results import Comparison, Trial
from optcli.compare.runners import OptimizerSpec
from optcli.compare.save import write_comparison
from optcli.compare.stats import Target
from optcli.config import DataConfig, read_yaml
from optcli.engine.loop import EpochMetrics, History
from optcli.errors import UserError
from optcli.limits import MAX_SUMMARY_BYTES, MAX_TRIALS, read_bounded
from optcli.rundir import signals
from optcli.rundir.files import RunLock, check_run_name, create_run_dir
from optcli.rundir.provenance import differences
from optcli.rundir.schema import parse_comparison_summary
from optcli.tasks.registry import get_task

EPOCH_FIELDS = [f.name for f in dataclasses.fields(EpochMetrics)]


def _read(run_dir: Path) -> tuple[dict, dict]:
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; name a comparison's run directory")
    path = run_dir / "summary.json"
    if not path.exists():
        raise UserError(f"{run_dir}: no summary.json; not a comparison run directory")
    summary = parse_comparison_summary(read_bounded(path, limit=MAX_SUMMARY_BYTES, what="summary"), str(path))
    return summary, _config_of(run_dir)


def _config_of(run_dir: Path) -> dict:
    """The resolved config a comparison ran with, without its own bookkeeping (specs, seeds, sources)."""
    path = Path(run_dir) / "config.yaml"
    config = read_yaml(path) if path.exists() else {}
    return {
        k: v for k, v in (config if isinstance(config, dict) else {}).items() if k not in ("compare", "merged_from")
    }


def merge_comparisons(run_dirs: list[str], *, out_dir: str = "runs", name: str | None = None) -> Comparison:
    """One comparison from several with the same optimizers and epochs; a (optimizer, seed) pair may appear once."""
    if len(run_dirs) < 2:
        raise UserError("merge: name at least two comparison run directories")
    if name is not None:
        check_run_name(name, "--name")
    summaries = [_read(Path(d)) for d in run_dirs]
    _check_size(run_dirs, [summary for summary, _ in summaries])
    first, config = summaries[0]
    specs = [OptimizerSpec(s["label"], s["name"], s["kwargs"], s.get("groups", [])) for s in first["specs"]]
    trials: list[Trial] = []
    seen: dict[tuple[str, int], str] = {}
    for run_dir, (summary, _) in zip(run_dirs, summaries, strict=True):
        _check_alike(run_dir, summary, run_dirs[0], first, config)
        trials += _trials(run_dir, summary, seen)
    seeds = sorted({t.seed for t in trials})
    _check_every_seed(specs, trials, seeds)
    target = Target(**first["target"]) if first.get("target") else None
    out = outcome(specs, trials, seeds=seeds, epochs=first["epochs"], target=target, floor=first.get("loss_floor"))
    parts = [summary.get("provenance") or {} for summary, _ in summaries]
    differ = differences(parts)
    # what the task adds to a comparison (a 2-D function's trajectories from each seed's start), from the config
    function = get_task(DataConfig(**config["data"])).describe_comparison(seeds, trials)
    out_path = create_run_dir(out_dir, name, prefix="compare-merged-")
    comparison = Comparison(
        specs=specs,
        seeds=seeds,
        epochs=first["epochs"],
        task=first["task"],
        trials=trials,
        rows=out.rows,
        verdicts=out.verdicts,
        curves=out.curves,
        run_dir=str(out_path),
        epoch_seconds=sum(e.seconds for t in trials for e in t.history.epochs),
        function=function,
        target=target.to_dict() if target is not None else None,
        loss_floor=first.get("loss_floor"),
        provenance=parts[0] if not differ else {"parts": dict(zip(run_dirs, parts, strict=True))},
        # the results still merge, but their last bits may not be comparable
        warnings=[f"the merged parts ran with different software or settings: {'; '.join(differ)}"] if differ else [],
    )
    config_yaml = yaml.safe_dump({**config, "merged_from": [str(d) for d in run_dirs]}, sort_keys=False)
    with RunLock(out_path), signals.stop_on_signals(), signals.held():
        figures = write_comparison(config_yaml, comparison, out_path)
    return dataclasses.replace(comparison, warnings=[*comparison.warnings, *figures]) if figures else comparison


def _check_size(run_dirs: list[str], summaries: list[dict]) -> None:
    """The merged comparison is bound by the limit of one comparison's trials (limits.py), as one run is."""
    counts = [len(s["trials"]) for s in summaries]
    if sum(counts) > MAX_TRIALS:
        parts = " + ".join(f"{d} ({n} trials)" for d, n in zip(run_dirs, counts, strict=True))
        raise UserError(
            f"merge: {parts} = {sum(counts)} trials, over the limit of {MAX_TRIALS} per comparison "
            "(each is a record in summary.json); merge fewer parts"
        )


def _check_alike(run_dir: str, summary: dict, first_dir: str, first: dict, config: dict) -> None:
    """A part merges when it finished and ran the same specs, epochs, task, target and config as the first."""
    if summary.get("status", "completed") != "completed":
        raise UserError(f"merge: {run_dir} is {summary['status']}; only finished comparisons merge")
    for key in ("specs", "epochs", "task", "target"):
        if summary.get(key) != first.get(key):
            raise UserError(f"merge: {run_dir} differs from {first_dir} in {key}; only like comparisons merge")
    other = {k: v for k, v in _config_of(Path(run_dir)).items() if k not in ("seed", "name")}
    if other != {k: v for k, v in config.items() if k not in ("seed", "name")}:
        diff = sorted(k for k in set(other) | set(config) if other.get(k) != config.get(k))
        raise UserError(f"merge: {run_dir} was run with another config than {first_dir} ({', '.join(diff)})")


def _trials(run_dir: str, summary: dict, seen: dict[tuple[str, int], str]) -> list[Trial]:
    """The part's trials with their histories; `seen` (pair -> the part it came from) refuses a pair twice."""
    trials = []
    for t in summary["trials"]:
        pair = (t["label"], t["seed"])
        if pair in seen:
            raise UserError(f"merge: {t['label']} seed {t['seed']} is in both {seen[pair]} and {run_dir}")
        seen[pair] = run_dir
        epochs = [{k: e[k] for k in EPOCH_FIELDS if k in e} for e in t["epochs"]]
        history = History.from_dict(
            {"epochs": epochs, **{k: t[k] for k in ("status", "diverged_at", "test_loss", "test_accuracy")}}
            | {"error": t.get("error")}  # absent from summaries written before trials could fail
        )
        trials.append(Trial(t["label"], t["seed"], history))
    return trials


def _check_every_seed(specs: list[OptimizerSpec], trials: list[Trial], seeds: list[int]) -> None:
    for spec in specs:
        have = {t.seed for t in trials if t.label == spec.label}
        if have != set(seeds):
            raise UserError(
                f"merge: {spec.label} lacks seed(s) {sorted(set(seeds) - have)}; every optimizer needs every seed"
            )
