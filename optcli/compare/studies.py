"""The Optuna side of tuning: the storage (checked before any directory is made), each optimizer's study and the
trials this machine asks of it, their results told back, and the wait for other machines' trials of a shared study.

A trial that a stop signal interrupts is told to the study as failed, with user attribute status "interrupted", and
its point is queued again: interrupted trials do not count against the budget, and the next run of the same command
(on any machine sharing the storage) runs their points first, so that a study resumes instead of waiting forever on
a trial left RUNNING.

A trial left RUNNING by a process that ended without telling it (SIGKILL, a machine lost) is found by its heartbeat:
the process running a trial beats for it every HEARTBEAT seconds (optuna's own heartbeat on a database; on a journal
file, which has none in optuna, a timestamp in the trial's system attributes), and a RUNNING trial without a beat for
`stale_seconds()` is failed (without a status: it never reported) and its point queued again, like an interrupted
one. Machines sharing a journal file need clocks that agree to well within that time.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optcli.engine.loop import History
from optcli.errors import UserError

if TYPE_CHECKING:
    from optcli.compare.tuning import Dimension

POLL_SECONDS = 2.0  # how often a machine looks whether the others' trials of a shared study have finished
INTERRUPTED = "interrupted"  # the status user attribute of a trial a stop signal ended
STALE_ENV = "OPTCLI_STALE_TRIAL_SECONDS"  # a RUNNING trial without a heartbeat for this long was left by a dead process
STALE_SECONDS = 60  # its default: a few missed beats, far above a busy machine's delays
HEARTBEAT = "optcli_heartbeat"  # the system attribute holding a journal trial's last beat (seconds since the epoch)


def stale_seconds() -> int:
    """OPTCLI_STALE_TRIAL_SECONDS (whole seconds, at least 2), or STALE_SECONDS."""
    text = os.environ.get(STALE_ENV, "").strip()
    if not text:
        return STALE_SECONDS
    if not text.isdigit() or int(text) < 2:
        raise UserError(f"{STALE_ENV}={text}: expected a whole number of seconds, at least 2 (default {STALE_SECONDS})")
    return int(text)


@dataclass
class Store:
    """An Optuna storage and the heartbeat of its trials: every `beat` seconds, failed after `grace` without one."""

    storage: Any
    grace: int
    database: bool = False  # optuna's RDBStorage, with optuna's own heartbeat; else a journal
    # the trials optuna's heartbeat failed (database): (study name, trial number), filled by its callback
    failed: list[tuple[str, int]] = field(default_factory=list)

    @property
    def beat(self) -> int:
        return max(1, self.grace // 4)

    def requeue(self, study, trial) -> None:
        """optuna's callback for a trial it failed for want of a heartbeat: its point queued again."""
        study.enqueue_trial(dict(trial.params))
        self.failed.append((study.study_name, trial.number))


def open_storage(url: str | None, run_dir: Path | None) -> Store:
    """An Optuna storage: a journal file in the run directory by default; a database URL or a journal path."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    grace = stale_seconds()
    if url is None:
        assert run_dir is not None
        return Store(JournalStorage(JournalFileBackend(str(run_dir / "tuning.journal"))), grace)
    if "://" in url:
        store = Store(None, grace, database=True)
        store.storage = _open_database(url, store)
        return store
    check_journal_path(url)
    return Store(JournalStorage(JournalFileBackend(str(url))), grace)


def check_storage(url: str | None) -> None:
    """--tune-storage, checked before any directory is made: a journal file in an existing folder, or a database
    URL of a known scheme whose driver is installed and which opens (optuna creates its tables in a new one); and
    the heartbeat's OPTCLI_STALE_TRIAL_SECONDS."""
    stale_seconds()
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


def _open_database(url: str, store: Store | None = None):
    """optuna's RDBStorage on `url` (with the store's heartbeat); every way it cannot be opened is one line
    naming the URL."""
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
    heartbeat: dict[str, Any] = {}
    if store is not None:
        heartbeat = dict(
            heartbeat_interval=store.beat, grace_period=store.grace, heartbeat_stale_trial_callback=store.requeue
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **heartbeat)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise UserError(f"--tune-storage {url}: cannot open the database ({reason[0] if reason else exc})") from None


def open_study(name: str, space: Sequence[Dimension], store: Store, *, seed: int):
    """The optimizer's study; its trial 0 is queued at the centre of its space."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.QMCSampler(
            qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False
        )
    study = optuna.create_study(
        study_name=name, storage=store.storage, sampler=sampler, direction="minimize", load_if_exists=True
    )
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({d.name: d.centre() for d in space})
    return study


def ask(study, space: Sequence[Dimension], *, budget: int) -> list:
    """The trials this machine is to run now: on a shared storage, other machines' trials count against the
    budget, interrupted ones and those left running by a dead process do not (their points are queued again
    and asked first)."""
    import optuna

    distributions: dict[str, optuna.distributions.BaseDistribution] = {
        d.name: optuna.distributions.FloatDistribution(d.low, d.high, log=d.log) for d in space
    }
    with warnings.catch_warnings():  # optuna's heartbeat is made for study.optimize; ask/tell beats it here
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return [study.ask(distributions) for _ in range(max(0, budget - len(_budget_trials(study, budget))))]


def _counts(trial) -> bool:
    """Interrupted trials do not count against the budget, nor failed ones without a status: optcli never told
    them (left running by a process that ended, failed for want of a heartbeat)."""
    from optuna.trial import TrialState

    status = trial.user_attrs.get("status")
    return status != INTERRUPTED and not (status is None and trial.state == TrialState.FAIL)


def _budget_trials(study, budget: int) -> list:
    """The study's first `budget` trials that count and were asked (not waiting to be)."""
    from optuna.trial import TrialState

    trials = (t for t in study.get_trials(deepcopy=False) if _counts(t) and t.state != TrialState.WAITING)
    return sorted(trials, key=lambda t: t.number)[:budget]


def tell(study, trial, history: History, score: float) -> bool:
    """One trial's result into its study; an interrupted one is marked failed and its point queued again. False
    when another process failed the trial meanwhile (no heartbeat reached it): its result is not counted."""
    import optuna
    from optuna.trial import TrialState

    try:
        trial.set_user_attr("status", history.status)
        trial.set_user_attr("epochs", len(history.epochs))
        if history.status == INTERRUPTED:
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(dict(trial.params))
            return True
        finite = math.isfinite(score)
        study.tell(trial, score if finite else None, state=TrialState.COMPLETE if finite else TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def settled(study, budget: int) -> bool:
    """Whether the study's first `budget` trials that count have all finished (other machines may run some)."""
    return all(t.state.is_finished() for t in _budget_trials(study, budget))


def counted_trials(study, budget: int) -> list:
    """The finished trials among the study's first `budget` that count: all of them once settled."""
    return [t for t in _budget_trials(study, budget) if t.state.is_finished()]


def fail_stale(study, store: Store) -> list[int]:
    """Fail the study's trials left RUNNING without a heartbeat for store.grace seconds and queue their points
    again; their numbers. On a database optuna's heartbeat finds them, on a journal the beats written here."""
    import optuna
    from optuna.trial import TrialState

    if store.database:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        found = [number for name, number in store.failed if name == study.study_name]
        store.failed[:] = [f for f in store.failed if f[0] != study.study_name]
        return found
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if time.time() - max(trial.system_attrs.get(HEARTBEAT, 0.0), started) <= store.grace:
            continue
        try:  # two machines may find it at once: the first to fail it queues its point
            store.storage.set_trial_state_values(_trial_id(store, study, trial.number), TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        study.enqueue_trial(dict(trial.params))
        found.append(trial.number)
    return found


def _trial_id(store: Store, study, number: int) -> int:
    storage = store.storage
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


@contextmanager
def heartbeats(store: Store, asked: list[tuple[Any, Any]]) -> Iterator[None]:
    """Beat for the (study, trial) pairs this process runs, every store.beat seconds, until the body ends; the
    first beat before the body, so that a trial is never without one."""
    ids = [_trial_id(store, study, trial.number) for study, trial in asked]
    stop = threading.Event()
    alive = [i for i in ids if _beat(store, i)]
    thread = threading.Thread(target=_beating, args=(store, alive, stop), name="optcli-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _beating(store: Store, ids: list[int], stop: threading.Event) -> None:
    from optuna.exceptions import StorageInternalError

    while ids and not stop.wait(store.beat):
        try:
            ids = [i for i in ids if _beat(store, i)]
        except (OSError, StorageInternalError):  # a write the storage refused now: the next beat tries again
            continue


def _beat(store: Store, trial_id: int) -> bool:
    """One beat; False when the trial can take none (finished: another process failed it for want of beats)."""
    import optuna

    try:
        if store.database:
            store.storage.record_heartbeat(trial_id)
        else:
            store.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True
