"""The options of `optcli compare`, as one typed object checked when it is made: every check that needs
neither a config nor torch. What depends on a task's config (a validation split for tuning, the target's metric)
is checked per task, by the comparison's preflight."""

from __future__ import annotations

from dataclasses import dataclass

from optcli.errors import UserError

BACKENDS = ("local", "ray")
TUNE_CENTRES = ("spec", "lr-find")


@dataclass(frozen=True, kw_only=True)
class CompareOptions:
    seeds: int = 3  # the config's seed, +1, ...
    targets: tuple[str, ...] = ()  # --target METRIC=VALUE: once for every task, or once per task
    tune: bool = False  # tune every hyperparameter of each optimizer's search space first
    tune_lr: bool = False  # tune the learning rate only
    tune_budget: int = 5  # trials per optimizer when tuning
    tune_storage: str | None = None  # an Optuna storage shared by machines (default: in the run directory)
    tune_centre: str = "spec"  # centre each lr range on the spec's lr, or on lr-find's suggestion
    jobs: int = 1  # processes that run trials
    threads: int | None = None  # torch threads per trial (default: all cores, or cores // jobs)
    vectorize: bool = False  # stack the seeds of each optimizer into one model where that is exact
    backend: str = "local"  # or ray: every trial a Ray task

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values and combinations no comparison can run, naming the flag."""
        for flag, value in (
            ("--seeds", self.seeds),
            ("--tune-budget", self.tune_budget),
            ("--jobs", self.jobs),
            ("--threads", self.threads),
        ):
            if value is not None and value < 1:
                raise UserError(f"{flag}: must be at least 1 (got {value})")
        self._validate_runner()
        self._validate_tuning()

    def _validate_runner(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"--backend: must be local or ray (got {self.backend!r})")
        if self.backend == "ray" and self.jobs > 1:
            raise UserError(
                "--jobs: runs trials on this machine; with --backend ray every trial is a Ray task (drop --jobs)"
            )
        if self.vectorize and (self.jobs > 1 or self.backend == "ray"):
            raise UserError("--vectorize: stacks the seeds in this process; drop --jobs and --backend ray")

    def _validate_tuning(self) -> None:
        if self.tune_storage is not None and not self.tuning:
            raise UserError("--tune-storage: only with --tune or --tune-lr")
        if self.tune_centre not in TUNE_CENTRES:
            raise UserError(f"--tune-centre: must be spec or lr-find (got {self.tune_centre!r})")
        if self.tune_centre == "lr-find" and not self.tuning:
            raise UserError("--tune-centre lr-find: only with --tune or --tune-lr")

    @property
    def tuning(self) -> bool:
        return self.tune or self.tune_lr

    @property
    def tune_flag(self) -> str:
        """The flag a tuning error names."""
        return "--tune" if self.tune else "--tune-lr"

    def task_targets(self, n_tasks: int) -> list[str | None]:
        """--target given once applies to every task; given once per --config, each to its own task, in order."""
        if not self.targets:
            return [None] * n_tasks
        if len(self.targets) == 1:
            return [self.targets[0]] * n_tasks
        if len(self.targets) != n_tasks:
            raise UserError(
                f"--target: given {len(self.targets)} times for {n_tasks} task(s); "
                "give it once (every task) or once per --config"
            )
        return [*self.targets]
