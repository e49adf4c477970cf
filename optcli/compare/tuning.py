"""Equal-budget hyperparameter search, one search space per optimizer (AlgoPerf's external tuning rules;
Choi et al. 2019 on why tuning the learning rate alone handicaps optimizers whose other settings matter).

Every optimizer gets the same number of trials (`budget`), drawn quasi-randomly from its own search space by
Optuna's QMCSampler (scrambled Sobol, a fixed seed) and trained on the first seed; each is judged on its best
validation loss only, and the winning setting is what the comparison then runs over all seeds. Trial 0 is the
centre of the space (Optuna's QMC sampler would draw its first trial at random: it infers the space from it), the
others follow the Sobol sequence. Trials run through the comparison's TrialRunner (serial or process pool), so
tuning has the same parallelism as the seeds.

The default space, for the hyperparameters an optimizer's signature has (values set in the spec stay fixed):
  lr                    log-uniform over two decades centred on the spec's lr or the default (or a given centre)
  one_minus_momentum    1 - momentum, a decade either side of 1 - its default (at most 1)
  one_minus_beta1, ...  1 - betas[i], likewise
  eps                   a decade either side of its default
  weight_decay          a decade either side of its default, or [1e-5, 1e-3] when the default is 0
`tuning.spaces` in the config overrides this per optimizer: {adam: {lr: [1e-4, 1e-2], eps: null}} (a pair is a
log-uniform range, null drops the dimension; any other numeric keyword of the optimizer may be added).

Studies live in an Optuna storage: by default a journal file in the run directory (embedded, nothing to start);
a database URL (sqlite:///, postgresql://, mysql://) or a shared journal file lets several machines run the same
command and draw their trials from the same studies (see README, next to merge).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard

from optcli.compare.options import CompareOptions
from optcli.compare.runners import OptimizerSpec, TrialRunner, TrialsInterrupted
from optcli.compare.studies import (
    POLL_SECONDS,
    Store,
    ask,
    counted_trials,
    fail_stale,
    heartbeats,
    open_storage,
    open_study,
    settled,
    tell,
)
from optcli.config import Config, optimizer_config
from optcli.engine.loop import History
from optcli.engine.optimizers import resolve_optimizer, signature_defaults
from optcli.errors import UserError
from optcli.rundir import signals

EDGE = 0.1  # a winner within this fraction of a dimension's (log) range from its end is "on the edge"


@dataclass
class Dimension:
    name: str
    low: float
    high: float
    log: bool = True

    def position(self, value: float) -> float:
        """Where `value` lies in the range, 0 at low and 1 at high (on the log scale when log)."""
        f = math.log if self.log else (lambda v: v)
        return (f(value) - f(self.low)) / (f(self.high) - f(self.low)) if self.high > self.low else 0.5

    def centre(self) -> float:
        return math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decade_around(value: float, cap: float | None = None) -> tuple[float, float]:
    return value / 10, min(value * 10, cap) if cap is not None else value * 10


def default_space(spec: OptimizerSpec, *, lr_only: bool = False, lr_centre: float | None = None) -> list[Dimension]:
    """The default search space of one optimizer, read from its signature (module docstring). `lr_centre`
    moves the centre of the lr range (e.g. to an lr-finder's suggestion)."""
    cls = resolve_optimizer(spec.name)
    defaults = signature_defaults(cls)
    centre = lr_centre if lr_centre is not None else spec.kwargs.get("lr", defaults.get("lr"))
    if not _number(centre) or centre <= 0:
        raise UserError(f"--tune: {spec.label} has no default learning rate; give one (e.g. {spec.label}:lr=0.01)")
    space = [Dimension("lr", float(centre) / 10, float(centre) * 10)]
    if lr_only:
        return space
    fixed = set(spec.kwargs) - {"lr"}
    momentum = defaults.get("momentum")
    if "momentum" not in fixed and _number(momentum) and 0 <= momentum < 1:
        space.append(Dimension("one_minus_momentum", *_decade_around(1 - momentum, cap=1.0)))
    betas = defaults.get("betas")
    if "betas" not in fixed and isinstance(betas, tuple) and all(_number(b) and 0 <= b < 1 for b in betas):
        space += [Dimension(f"one_minus_beta{i + 1}", *_decade_around(1 - b, cap=1.0)) for i, b in enumerate(betas)]
    eps = defaults.get("eps")
    if "eps" not in fixed and _number(eps) and eps > 0:
        space.append(Dimension("eps", *_decade_around(float(eps))))
    decay = defaults.get("weight_decay")
    if "weight_decay" not in fixed and _number(decay) and decay >= 0:
        space.append(Dimension("weight_decay", *(_decade_around(float(decay)) if decay > 0 else (1e-5, 1e-3))))
    return space


def _override_key(spec: OptimizerSpec, spaces: dict[str, Any]) -> str | None:
    for key in (spec.label, spec.name, spec.name.lower(), resolve_optimizer(spec.name).__name__.lower()):
        if key in spaces:
            return key
    return None


def search_space(
    spec: OptimizerSpec,
    *,
    overrides: dict[str, Any] | None = None,
    lr_only: bool = False,
    lr_centre: float | None = None,
) -> list[Dimension]:
    """The default space with the config's overrides for this optimizer (tuning.spaces.<label or name>)."""
    space = {d.name: d for d in default_space(spec, lr_only=lr_only, lr_centre=lr_centre)}
    key = _override_key(spec, overrides or {})
    if key is None:
        return list(space.values())
    allowed = set(space) | {d.name for d in default_space(spec)}
    allowed |= {k for k, v in signature_defaults(resolve_optimizer(spec.name)).items() if _number(v)}
    for name, bounds in (overrides or {})[key].items():
        where = f"tuning.spaces.{key}.{name}"
        if name not in allowed:
            hint = difflib.get_close_matches(name, sorted(allowed), n=1)
            more = f"did you mean '{hint[0]}'? " if hint else ""
            raise UserError(
                f"{where}: not a hyperparameter of {spec.label} ({more}valid: {', '.join(sorted(allowed))})"
            )
        if bounds is None:
            space.pop(name, None)
            continue
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_number(b) and b > 0 for b in bounds)):
            raise UserError(f"{where}: expected [low, high] with 0 < low < high (a log-uniform range) or null")
        if not all(math.isfinite(b) for b in bounds):
            raise UserError(f"{where}: the bounds must be finite numbers (got {bounds})")
        if not bounds[0] < bounds[1]:
            raise UserError(f"{where}: low must be below high (got {bounds})")
        if name.startswith("one_minus_") and bounds[1] > 1:
            raise UserError(f"{where}: 1 - {name.removeprefix('one_minus_')} is at most 1 (got {bounds[1]})")
        space[name] = Dimension(name, float(bounds[0]), float(bounds[1]))
    if "lr" not in space and "lr" not in spec.kwargs:
        raise UserError(f"tuning.spaces.{key}.lr: dropped, so give {spec.label} an lr in its spec")
    return list(space.values())


def check_overrides(specs: list[OptimizerSpec], overrides: dict[str, Any]) -> None:
    """Every entry of tuning.spaces names an optimizer of the comparison."""
    keys = {k for s in specs if (k := _override_key(s, overrides)) is not None}
    for key in overrides:
        if key not in keys:
            labels = ", ".join(s.label for s in specs)
            raise UserError(f"tuning.spaces.{key}: matches no optimizer of this comparison ({labels})")


def kwargs_at(spec: OptimizerSpec, point: dict[str, float]) -> dict[str, Any]:
    """The optimizer's keywords at a point of its space: 1 - x back to momentum and betas."""
    defaults = signature_defaults(resolve_optimizer(spec.name))
    kwargs = dict(spec.kwargs)
    betas = list(kwargs.get("betas", defaults.get("betas")) or [])
    for name, value in point.items():
        if name == "one_minus_momentum":
            kwargs["momentum"] = 1 - value
        elif name.startswith("one_minus_beta"):
            betas[int(name.removeprefix("one_minus_beta")) - 1] = 1 - value
            kwargs["betas"] = tuple(betas)
        else:
            kwargs[name] = value
    return kwargs


def study_name(spec: OptimizerSpec, space: list[Dimension], *, budget: int, seed: int, task: str) -> str:
    """The same on every machine that runs the same command, different for anything that changes the trials."""
    key = json.dumps([task, spec.name, spec.kwargs, [asdict(d) for d in space], budget, seed], default=str)
    return f"{spec.label}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


LR_FIND_STEPS = 100  # the range test's steps for --tune-centre lr-find, the same for every optimizer


def lr_find_centres(cfg: Config, specs: list[OptimizerSpec], *, seed: int) -> dict[str, dict]:
    """Each spec's lr-find suggestion on the tuning seed, to centre its lr range on (--tune-centre lr-find). Every
    optimizer's range test gets the same LR_FIND_STEPS, counted in its tuning cost; a test that suggests nothing
    leaves the spec's own centre."""
    from optcli.engine.model import resolve_device
    from optcli.lr_find import RangeTestOptions, range_test
    from optcli.tasks import load_data

    seeded = cfg.model_copy(update={"seed": seed, "scheduler": None})
    data = load_data(seeded.data, resolve_device(cfg.device))
    out = {}
    for spec in specs:
        kwargs = {k: v for k, v in spec.kwargs.items() if k != "lr"}
        run_cfg = seeded.model_copy(
            update={"optimizer": optimizer_config(spec.name, kwargs, f"optimizer {spec.label}")}
        )
        result = range_test(run_cfg, data, RangeTestOptions(steps=LR_FIND_STEPS))
        out[spec.label] = {
            "suggestion": result.suggestion,
            "rule": result.rule,
            "steps": LR_FIND_STEPS,  # the allotment, counted whether or not the test stopped early
            "steps_run": len(result.losses),  # steps with a finite loss
            "stopped": result.stopped,
        }
    return out


def _score(history: History) -> float:
    best = history.best()
    if history.status == "diverged" or best is None or best.val_loss is None:
        return math.inf
    return best.val_loss


@dataclass(frozen=True)
class Tuned:
    record: dict  # the space, every trial, the winner and edge flags of each optimizer
    histories: list[History]  # of the trials run here
    specs: list[OptimizerSpec]  # each with its winning setting (its own where no trial finished, or when stopped)
    stopped: int | None = None  # the stop signal that ended the tuning: its record holds the trials finished
    warnings: list[str] = field(default_factory=list)  # trials left running by a process that ended, ...


def tune(
    specs: list[OptimizerSpec],
    *,
    options: CompareOptions,
    seed: int,
    runner: TrialRunner,
    task: str,
    run_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    lr_find: dict[str, dict] | None = None,
) -> Tuned:
    """Tune every spec with the same budget (options.tune_budget), the lr alone unless options.tune; returns the
    tuning record, the histories of the trials run here, and the specs with their winning settings. A stop signal
    ends it with what finished told to the studies, the interrupted trials marked so (studies.py), and `stopped`."""
    try:
        import optuna
    except ImportError:
        raise UserError("--tune needs optcli[tune]: pip install 'optcli[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_overrides(specs, overrides or {})
    centres = {label: found["suggestion"] for label, found in (lr_find or {}).items()}
    lr_only, budget = not options.tune, options.tune_budget
    spaces = {
        s.label: search_space(s, overrides=overrides, lr_only=lr_only, lr_centre=centres.get(s.label)) for s in specs
    }
    names = {s.label: study_name(s, spaces[s.label], budget=budget, seed=seed, task=task) for s in specs}
    run = _Rounds(open_storage(options.tune_storage, run_dir), budget, seed)
    run.run(specs, spaces, names, runner)
    stopped = run.stopped
    record: dict[str, Any] = {
        "budget": budget,
        "seed": seed,
        "sampler": "Optuna QMCSampler, scrambled Sobol (trial 0 at the centre of the space)",
        "selected_by": "best validation loss",
        "storage": options.tune_storage or str(Path(run_dir or ".") / "tuning.journal"),
        "lr_only": lr_only,
        "lr_centre": "lr-find" if lr_find else "spec",
        "optimizers": {},
        **({"status": "interrupted"} if stopped is not None else {}),
    }
    tuned = []
    for spec in (s for s in specs if s.label in run.studies):
        entry, winner = _settle(spec, run.studies[spec.label], spaces[spec.label], budget)
        mine = [h for (s, _), h in zip(run.asked, run.histories, strict=True) if s.label == spec.label]
        found = (lr_find or {}).get(spec.label)
        # the optimizer steps this machine spent tuning it: every trial's, plus its range test's allotment
        entry["cost_steps"] = sum(h.epochs[-1].steps for h in mine if h.epochs) + (found["steps"] if found else 0)
        if found:
            entry["lr_find"] = found
        record["optimizers"][spec.label] = entry
        tuned.append(replace(spec, kwargs=winner) if winner is not None else spec)
    return Tuned(record, run.histories, tuned if stopped is None else specs, stopped, run.warnings)


class _Rounds:
    """The trials of every study, in rounds: fail the trials left running by a dead process, ask this machine's
    trials, run them with heartbeats and tell the results; with none to ask, wait for other machines' trials
    until every study has its budget settled. Asking and telling are never cut by a signal, so that no trial is
    left RUNNING in a study; a signal while trials run marks the unfinished ones interrupted and ends the rounds."""

    def __init__(self, store: Store, budget: int, seed: int):
        self.store, self.budget, self.seed = store, budget, seed
        self.studies: dict[str, Any] = {}
        self.asked: list[tuple[OptimizerSpec, Any]] = []  # every trial run here, in order
        self.histories: list[History] = []  # theirs
        self.warnings: list[str] = []
        self.stopped: int | None = None

    def run(
        self,
        specs: list[OptimizerSpec],
        spaces: dict[str, list[Dimension]],
        names: dict[str, str],
        runner: TrialRunner,
    ) -> None:
        try:
            with signals.held():
                for spec in specs:
                    self.studies[spec.label] = open_study(
                        names[spec.label], spaces[spec.label], self.store, seed=self.seed
                    )
            while self.stopped is None:
                if not self._round(specs, spaces, runner):
                    if all(settled(study, self.budget) for study in self.studies.values()):
                        return
                    time.sleep(min(POLL_SECONDS, self.store.beat))  # other machines' trials: a result or no beat
        except KeyboardInterrupt as exc:  # while opening the studies or waiting for other machines' trials
            self.stopped = signals.signum_of(exc)

    def _round(self, specs: list[OptimizerSpec], spaces: dict[str, list[Dimension]], runner: TrialRunner) -> bool:
        """One round; False when there was nothing to ask."""
        batch: list[tuple[OptimizerSpec, Any]] = []
        histories = None
        try:
            with signals.held():
                for spec in specs:
                    self._fail_stale(spec)
                    trials = ask(self.studies[spec.label], spaces[spec.label], budget=self.budget)
                    batch += [(spec, trial) for trial in trials]
            if not batch:
                return False
            with heartbeats(self.store, [(self.studies[s.label], t) for s, t in batch]):
                histories = runner.run(
                    [(OptimizerSpec(s.label, s.name, kwargs_at(s, t.params)), self.seed) for s, t in batch]
                )
        except TrialsInterrupted as exc:
            histories, self.stopped = exc.histories, exc.signum
        except KeyboardInterrupt as exc:  # between the asking and the trials starting
            self.stopped = signals.signum_of(exc)
        histories = histories or [History(status="interrupted") for _ in batch]
        with signals.held():
            for (spec, trial), history in zip(batch, histories, strict=True):
                if not tell(self.studies[spec.label], trial, history, _score(history)):
                    self.warnings.append(
                        f"tuning trial {trial.number} of {spec.label} was failed by another process (no heartbeat "
                        f"from here for {self.store.grace} s): its result is not counted"
                    )
            self.asked += batch
            self.histories += histories
        return True

    def _fail_stale(self, spec: OptimizerSpec) -> None:
        for number in fail_stale(self.studies[spec.label], self.store):
            self.warnings.append(
                f"tuning trial {number} of {spec.label} was left running by a process that ended (no heartbeat "
                f"for {self.store.grace} s): marked failed and run again"
            )


def _settle(spec: OptimizerSpec, study, space: list[Dimension], budget: int) -> tuple[dict, dict[str, Any] | None]:
    """The record of the first `budget` trials finished, and the winner's keywords (None when none finished)."""
    trials = counted_trials(study, budget)
    rows = [
        {
            "number": t.number,
            "params": dict(t.params),
            "kwargs": _jsonable(kwargs_at(spec, t.params)),
            "val_loss": t.value if t.value is not None and math.isfinite(t.value) else None,
            "status": t.user_attrs.get("status", t.state.name.lower()),
        }
        for t in trials
    ]
    done = [r for r in rows if r["val_loss"] is not None]
    out: dict[str, Any] = {
        "study": study.study_name,
        "space": [asdict(d) for d in space],
        "trials": rows,
        "best": None,
        "at_edge": [],
    }
    if not done:
        out["note"] = "no trial finished with a finite validation loss: the spec's own settings are run"
        return out, None
    best = min(done, key=lambda r: r["val_loss"])
    out["best"] = best
    for d in space:
        u = d.position(best["params"][d.name])
        if u < EDGE or u > 1 - EDGE:
            out["at_edge"].append({"name": d.name, "side": "low" if u < EDGE else "high"})
    return out, kwargs_at(spec, best["params"])


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def tuning_rows(record: dict) -> list[dict]:
    """One row per trial for tuning.csv."""
    rows = []
    names = list(dict.fromkeys(d["name"] for t in record["optimizers"].values() for d in t["space"]))
    for label, t in record["optimizers"].items():
        for r in t["trials"]:
            rows.append(
                {
                    "optimizer": label,
                    "trial": r["number"],
                    **{n: r["params"].get(n) for n in names},
                    "val_loss": r["val_loss"],
                    "status": r["status"],
                    "best": t["best"] is not None and r["number"] == t["best"]["number"],
                }
            )
    return rows
