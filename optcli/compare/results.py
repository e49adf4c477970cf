"""What a comparison is, as plain data: its trials (an optimizer spec trained from one seed) and the comparison
built from them once, with its tables, verdicts and curves (aggregate.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from optcli.compare.runners import OptimizerSpec
from optcli.engine.loop import History


@dataclass
class Trial:
    label: str
    seed: int
    history: History
    lr: float | None = None  # the learning rate tried, for tuning trials


@dataclass(frozen=True)
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
    # or interrupted: a stop signal ended it, unfinished trials are marked interrupted; failed: every trial raised an
    # error (a Ray worker lost twice, ...); partly_failed: some did (comparison.ending)
    status: str = "completed"
    interrupted_by: str | None = None  # the signal's name
    target: dict | None = None  # {"metric", "value", "higher_is_better"} of --target
    loss_floor: float | None = None  # the best achievable validation loss of the task, when known
    provenance: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trials"] = [{"label": t.label, "seed": t.seed, "lr": t.lr, **t.history.to_dict()} for t in self.trials]
        return d
