"""The Optuna side of tuning: the storage (checked before any directory is made), each optimizer's study and the
trials this machine asks of it, their results told back, and the wait for other machines' trials of a shared study.

A trial that a stop signal interrupts is told to the study as failed, with user attribute status "interrupted", and
its point is queued again: interrupted trials do not count against the budget, and the next run of the same command
(on any machine sharing the storage) runs their points first, so that a study resumes instead of waiting forever on
a trial left RUNNING.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from optcli.engine.loop import History
from optcli.errors import UserError

if TYPE_CHECKING:
    from optcli.compare.tuning import Dimension

POLL_SECONDS = 2.0  # how often a machine looks whether the others' trials of a shared study have finished
INTERRUPTED = "interrupted"  # the status user attribute of a trial a stop signal ended


def open_storage(url: str | None, run_dir: Path | None):
    """An Optuna storage: a journal file in the run directory by default; a database URL or a journal path."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        assert run_dir is not None
        return JournalStorage(JournalFileBackend(str(run_dir / "tuning.journal")))
    if "://" in url:
        return _open_database(url)
    check_journal_path(url)
    return JournalStorage(JournalFileBackend(str(url)))


def check_storage(url: str | None) -> None:
    """--tune-storage, checked before any directory is made: a journal file in an existing folder, or a database
    URL of a known scheme whose driver is installed and which opens (optuna creates its tables in a new one)."""
    if url is None:
        return
    if "://" in url:
        _open_database(url)
    else:
        check_journal_path(url)


def check_journal_path(url: str) -> None:
    path = Path(url)
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"--tune-storage {url}: expected a journal file in an existing folder, or a database URL")


def _open_database(url: str):
    """optuna's RDBStorage on `url`; every way it cannot be opened is one line naming the URL."""
    import optuna
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect()
    except NoSuchModuleError:  # before ArgumentError, its base class
        raise UserError(
            f"--tune-storage {url}: unknown database scheme '{url.partition('://')[0]}' "
            "(sqlite:///FILE, postgresql://..., mysql://..., or a journal file path)"
        ) from None
    except ArgumentError:
        raise UserError(f"--tune-storage {url}: not a database URL (e.g. sqlite:///studies.db)") from None
    except ImportError as exc:
        raise UserError(f"--tune-storage {url}: the database driver is not installed ({exc})") from None
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
        if not Path(database).parent.is_dir():
            raise UserError(f"--tune-storage {url}: the folder {Path(database).parent} does not exist")
    try:
        return optuna.storages.RDBStorage(url)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise UserError(f"--tune-storage {url}: cannot open the database ({reason[0] if reason else exc})") from None


def open_study(name: str, space: Sequence[Dimension], storage, *, budget: int, seed: int):
    """The optimizer's study (trial 0 at the centre of its space) and the trials this machine is to run: on a
    shared storage, other machines' trials count against the budget, interrupted ones do not (their points are
    queued again and asked first)."""
    import optuna
    from optuna.trial import TrialState

    distributions: dict[str, optuna.distributions.BaseDistribution] = {
        d.name: optuna.distributions.FloatDistribution(d.low, d.high, log=d.log) for d in space
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.QMCSampler(
            qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False
        )
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
    )
    trials = study.get_trials(deepcopy=False)
    if not trials:
        study.enqueue_trial({d.name: d.centre() for d in space})
    counted = [t for t in trials if _counts(t) and t.state != TrialState.WAITING]
    return study, [study.ask(distributions) for _ in range(max(0, budget - len(counted)))]


def _counts(trial) -> bool:
    return trial.user_attrs.get("status") != INTERRUPTED


def tell(study, trial, history: History, score: float) -> None:
    """One trial's result into its study; an interrupted one is marked failed and its point queued again."""
    from optuna.trial import TrialState

    trial.set_user_attr("status", history.status)
    trial.set_user_attr("epochs", len(history.epochs))
    if history.status == INTERRUPTED:
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params))
        return
    finite = math.isfinite(score)
    study.tell(trial, score if finite else None, state=TrialState.COMPLETE if finite else TrialState.FAIL)


def counted_trials(study, budget: int, *, wait: bool = True) -> list:
    """The study's first `budget` trials that count (not interrupted) once all have finished: other machines may
    still run theirs. Without `wait`, the finished ones among them now (an interrupted tuning's record)."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    while True:
        trials = sorted((t for t in study.get_trials(deepcopy=False) if _counts(t)), key=lambda t: t.number)[:budget]
        if not wait:
            return [t for t in trials if t.state in done]
        if all(t.state in done for t in trials):
            return trials
        time.sleep(POLL_SECONDS)
