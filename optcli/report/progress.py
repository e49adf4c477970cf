"""Rich progress displays fed by the core's callbacks; they appear only once work starts."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from optcli.report.console import err_console
from optcli.report.format import fmt

if TYPE_CHECKING:
    from optcli.engine.loop import History
    from optcli.tasks import Data


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),  # last: on a narrow terminal the free text is cut, not the numbers
        console=err_console,
        transient=transient,
    )


P = TypeVar("P", bound="LazyProgress")


class LazyProgress:
    """A Rich progress display that appears only once work starts, so an input error prints one clean line."""

    def __init__(self) -> None:
        self.progress = progress_bar()
        self.started = False

    def __enter__(self: P) -> P:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.started:
            self.progress.stop()

    def begin(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True


class TrainProgress(LazyProgress):
    """A progress bar over epochs (and the batches of the current one), fed by the training callbacks."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epoch_task = self.progress.add_task("epochs", total=epochs, info="")  # shown once begin() runs
        self.batch_task = self.progress.add_task("batches", total=None, info="")

    def start(self, run_dir: Path | None, start_epoch: int, data: Data) -> None:
        self.begin()
        self.progress.update(self.epoch_task, completed=start_epoch - 1)

    def batch(self, epoch: int, done: int, batches: int) -> None:
        self.progress.update(self.batch_task, completed=done, total=batches, description=f"epoch {epoch}")

    def epoch(self, history: History) -> None:
        e = history.epochs[-1]
        info = f"train {fmt(e.train_loss)}" + (f"  val {fmt(e.val_loss)}" if e.val_loss is not None else "")
        self.progress.update(self.epoch_task, completed=e.epoch, info=info)


class CompareProgress(LazyProgress):
    """One bar over all (optimizer, seed) trials, and one over the epochs of the trial under way."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.trials = self.progress.add_task("trials", total=None, info="")  # shown once begin() runs
        self.current = self.progress.add_task("epochs", total=epochs, info="")

    def plan(self, n_trials: int) -> None:
        self.begin()
        self.progress.update(self.trials, total=n_trials)

    def trial_start(self, label: str, seed: int) -> None:
        self.progress.update(self.current, completed=0, description=f"{label} seed {seed}", info="")

    def epoch(self, history: History) -> None:
        e = history.epochs[-1]
        self.progress.update(
            self.current, completed=e.epoch, info=f"loss {fmt(e.val_loss if e.val_loss is not None else e.train_loss)}"
        )

    def trial_done(self, label: str, seed: int, history: History) -> None:
        self.progress.update(self.trials, advance=1, info=f"{label} seed {seed}: {history.status}")
