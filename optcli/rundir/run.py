"""One training run from a Config: check everything, build data, model and optimizer, fit, and keep the
run directory up to date (config.yaml, metrics.csv, metrics.jsonl, summary.json, last.pt)."""

from __future__ import annotations

import copy
import shutil
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optcli.config import Config, to_yaml
from optcli.engine import distributed
from optcli.engine.build import build_model_and_optimizer, torch_settings
from optcli.engine.distributed import Dist
from optcli.engine.dynamics import epoch_callbacks
from optcli.engine.loop import History, Training, fit, grad_scaler
from optcli.engine.optimizers import resolve_optimizer
from optcli.errors import RunInterrupted, SystemRefused
from optcli.rundir import signals
from optcli.rundir.files import (
    RunLock,
    atomic_write_files,
    atomic_write_text,
    checkpoint_bytes,
    create_run_dir,
    csv_text,
    json_text,
    jsonl_text,
    load_checkpoint,
    remove_stale_temp_files,
)
from optcli.rundir.loggers import make_loggers
from optcli.rundir.preflight import preflight
from optcli.rundir.provenance import provenance
from optcli.rundir.resume import check_resume, restore
from optcli.rundir.schema import FORMAT_VERSION
from optcli.tasks import Data, load_data
from optcli.tasks.registry import describe_task
from optcli.tasks.regression import loss_floor

CHECKPOINT_INTERVAL_S = 1.0  # last.pt is rewritten at most this often (and always after the final epoch)


@dataclass
class TrainResult:
    run_dir: Path | None  # None on the ranks of a torchrun job other than 0, which write nothing
    history: History
    summary: dict
    start_epoch: int  # 1, or the epoch a resumed run continued from
    primary: bool = True  # rank 0 (or the only process): the one that prints
    warnings: list[str] = field(default_factory=list)  # a figure that could not be drawn


def training_state(model, optimizer, scheduler, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Everything a resumed run needs besides its history, copied so that training can go on meanwhile."""
    return clone_state(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
    )


def clone_state(value):
    """A deep copy that clones tensors directly: copy.deepcopy goes through each tensor's storage with a memo and
    took 3x as long: about 30% of the default task's training time (cProfile of `optcli train`)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return copy.deepcopy(value)


def warm_seconds_per_epoch(history: History) -> float | None:
    """The median epoch time after the first epoch, which pays for warm-up (allocations, caches, lazy imports); the
    only epoch's time when there is one. The median, so that one slow epoch (another process) does not move it."""
    seconds = [e.seconds for e in history.epochs]
    return statistics.median(seconds[1:] or seconds) if seconds else None


def summarize(
    cfg: Config,
    history: History,
    *,
    device: torch.device,
    seconds: float,
    world: int = 1,
    interrupted_by: str | None = None,
    error: str | None = None,
) -> dict:
    """The run's outcome, the excess validation loss over the task's floor when it has one, and provenance."""
    best = history.best()
    floor = loss_floor(cfg.data, cfg.train.reduction)
    last = history.epochs[-1] if history.epochs else None
    return {
        "format": FORMAT_VERSION,
        "status": history.status,
        "interrupted_by": interrupted_by,  # the signal's name, when status is interrupted
        "error": error,  # why, when status is failed
        "epochs_completed": len(history.epochs),
        "epochs_planned": cfg.train.epochs,
        "diverged_at": history.diverged_at,
        "stopped_early": history.stopped_early,
        "final": vars(last) if last else None,
        "best": vars(best) if best else None,
        "test_loss": history.test_loss,
        "test_accuracy": history.test_accuracy,
        "task": describe_task(cfg.data),
        "val_loss_floor": floor,
        "excess_val_loss": best.val_loss - floor if floor is not None and best and best.val_loss is not None else None,
        "seconds": seconds,
        "seconds_per_epoch": (sum(e.seconds for e in history.epochs) / len(history.epochs)) if history.epochs else None,
        "seconds_per_epoch_median_warm": warm_seconds_per_epoch(history),
        "device": str(device),
        "world_size": world,  # processes of a torchrun job
        "torch": torch.__version__,
        "optimizer": cfg.optimizer.model_dump(mode="json"),
        "provenance": provenance(
            device=device, threads=torch.get_num_threads(), optimizer_classes=[resolve_optimizer(cfg.optimizer.name)]
        ),
    }


class RunWriter:
    """Keeps a run directory consistent: the checkpoint and the metrics files always describe the same epoch.

    After each epoch the training state is copied in memory (cheap next to an epoch); it is written out at
    most every CHECKPOINT_INTERVAL_S, after the final epoch, and on Ctrl-C, when the epoch under way is
    abandoned and the copy of the last completed one is what gets saved."""

    def __init__(self, run_dir: Path, cfg: Config, device: torch.device, world: int = 1):
        self.run_dir, self.cfg, self.device, self.world = run_dir, cfg, device, world
        self.state: dict | None = None
        self.history = History()
        self.written = History()  # the history the files on disk describe
        self.last_write = 0.0
        self.started = time.perf_counter()

    def epoch_done(self, history: History, *, model, optimizer, scheduler, scaler=None, force: bool = False) -> None:
        self.state = training_state(model, optimizer, scheduler, scaler)
        self.history = History(list(history.epochs), history.status, history.diverged_at)
        if force or time.monotonic() - self.last_write >= CHECKPOINT_INTERVAL_S:
            self.flush()

    def flush(
        self,
        status: str | None = None,
        history: History | None = None,
        interrupted_by: str | None = None,
        error: str | None = None,
    ) -> None:
        history = history or self.history
        if status is not None:
            history.status = status
        files = self.files(history, interrupted_by=interrupted_by, error=error)  # serialized before any is replaced
        with signals.held():
            atomic_write_files(files)
        self.written = History(list(history.epochs), history.status, history.diverged_at)
        self.last_write = time.monotonic()

    def write_plot(self, history: History | None = None) -> list[str]:
        """loss.png next to the metrics: train and validation loss, accuracy, lr; then report.html. Returns a
        warning line when the figure could not be drawn (the run's files stand)."""
        from optcli.report.plots import drawn, save_run_plot  # matplotlib only once a run has something to draw

        history = history or self.history
        warning = drawn(self.run_dir / "loss.png", lambda p: save_run_plot(history, p)) if history.epochs else None
        from optcli.report.html import report_after_run

        report_after_run(self.run_dir)  # after summary.json is whole; when it fails the CLI says there is none
        return [warning] if warning else []

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed with the reason, where the disk still allows it; the summary must not say running."""
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        self.history.status = "failed"
        try:
            self.flush(error=reason)
            return
        except (OSError, SystemRefused):
            pass
        # no room for a checkpoint (a full disk): the small files say failed, about the epochs the checkpoint holds
        self.written.status = "failed"
        try:
            with signals.held():
                atomic_write_files(self.files(self.written, error=reason, checkpoint=False))
        except (OSError, SystemRefused):
            pass  # the disk that failed the run fails this too; the original error is what gets reported

    def files(
        self,
        history: History,
        *,
        interrupted_by: str | None = None,
        error: str | None = None,
        checkpoint: bool = True,
    ) -> dict[Path, bytes]:
        """The run directory's files for `history`, in the order they are renamed into place: the checkpoint
        first, the summary last."""
        files = {}
        if self.state is not None and checkpoint:
            state = {**self.state, "history": history.to_dict(), "config": self.cfg.model_dump(mode="json")}
            files[self.run_dir / "last.pt"] = checkpoint_bytes(state)
        if "csv" in self.cfg.train.loggers:
            files[self.run_dir / "metrics.csv"] = csv_text([e.csv_row() for e in history.epochs]).encode()
            files[self.run_dir / "metrics.jsonl"] = jsonl_text([vars(e) for e in history.epochs]).encode()
        summary = summarize(
            self.cfg,
            history,
            device=self.device,
            seconds=time.perf_counter() - self.started,
            world=self.world,
            interrupted_by=interrupted_by,
            error=error,
        )
        files[self.run_dir / "summary.json"] = json_text(summary).encode()
        return files


def train_run(
    cfg: Config,
    *,
    resume: str | None = None,
    on_start: Callable | None = None,
    on_epoch: Callable[[History], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> TrainResult:
    """One training run; under torchrun, one rank of a DistributedDataParallel job (only rank 0 writes and reports)."""
    dist = distributed.from_env()
    with signals.stop_on_signals():
        device = distributed.init(dist, preflight(cfg, dist=dist))
        try:
            with torch_settings(cfg):
                return _train(
                    cfg,
                    dist=dist,
                    device=device,
                    resume=resume,
                    on_start=on_start,
                    on_epoch=on_epoch,
                    on_batch=on_batch,
                )
        except KeyboardInterrupt as exc:  # before a run directory was written to, or on a rank that writes none
            raise RunInterrupted(None, signals.signum_of(exc)) from None
        finally:
            distributed.shutdown(dist)


def _train(
    cfg: Config, *, dist: Dist, device: torch.device, resume: str | None, on_start, on_epoch, on_batch
) -> TrainResult:
    # the lock is taken before the checkpoint is read, so that two resumes never both read and then both write
    lock = RunLock(resume).acquire() if resume and dist.primary else None
    try:
        return _train_locked(
            cfg, dist=dist, device=device, resume=resume, on_start=on_start, on_epoch=on_epoch, on_batch=on_batch
        )
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    cfg: Config, *, dist: Dist, device: torch.device, resume: str | None, on_start, on_epoch, on_batch
) -> TrainResult:
    data, (model, optimizer, scheduler, scaler), history = _build(cfg, device, resume)
    train_model = _train_model(cfg, model, dist, device)
    start_epoch = len(history.epochs) + 1
    writer, lock = _open_run_dir(cfg, device, dist, resume) if dist.primary else (None, None)
    if writer is None:  # a rank of a torchrun job other than 0 reports nothing
        on_epoch = on_batch = None
    elif on_start is not None:
        on_start(writer.run_dir, start_epoch, data)
    callbacks = epoch_callbacks(cfg, model, optimizer)
    if writer is not None:
        callbacks += make_loggers(cfg, writer.run_dir, n_train=len(data.train))

    def epoch_done(h: History) -> None:
        if writer is not None:
            last = h.status == "diverged" or len(h.epochs) == cfg.train.epochs
            writer.epoch_done(h, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, force=last)
        if on_epoch is not None:
            on_epoch(h)

    started = time.perf_counter()
    figure_warnings: list[str] = []
    try:
        history = fit(
            Training(cfg, model, optimizer, scheduler, data, train_model=train_model, dist=dist, scaler=scaler),
            history=history,
            on_epoch=epoch_done,
            on_batch=on_batch,
            callbacks=callbacks,
        )
        if writer is not None:
            writer.flush(history=history)  # the final status and the test metrics
            figure_warnings = writer.write_plot(history)
    except BaseException as exc:
        interrupted = _record_end(exc, writer)
        if interrupted is None:
            raise
        raise interrupted from None
    finally:
        for callback in callbacks:
            callback.close()
        if lock is not None:
            lock.release()
    summary = summarize(cfg, history, device=device, seconds=time.perf_counter() - started, world=dist.world)
    run_dir = writer.run_dir if writer else None
    return TrainResult(run_dir, history, summary, start_epoch, dist.primary, figure_warnings)


def _build(cfg: Config, device: torch.device, resume: str | None) -> tuple[Data, tuple, History]:
    """The data, the model, optimizer, scheduler and scaler, and the history so far: empty, or a resumed run's,
    with the state of its checkpoint put back (checked against the config before anything is written)."""
    checkpoint = load_checkpoint(Path(resume) / "last.pt") if resume else None
    if checkpoint is not None:
        check_resume(checkpoint, cfg, str(resume))
    data = load_data(cfg.data, device)
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, device)
    scaler = grad_scaler(cfg.train.precision, device)  # its loss scale is part of the state of a float16 run
    if checkpoint is None:
        return data, (model, optimizer, scheduler, scaler), History()
    history = restore(checkpoint, model, optimizer, scheduler, scaler, str(resume))
    return data, (model, optimizer, scheduler, scaler), history


def _train_model(cfg: Config, model: torch.nn.Module, dist: Dist, device: torch.device) -> Any:
    """The module run forward in training: the model, wrapped for DDP and compiled when asked."""
    train_model: Any = model
    if dist.enabled:  # the checkpoint keeps the unwrapped model, so DDP and single-process runs resume each other
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    return train_model


def _open_run_dir(
    cfg: Config, device: torch.device, dist: Dist, resume: str | None
) -> tuple[RunWriter, RunLock | None]:
    """The run directory with its config.yaml (a resumed run's own, cleared of a crash's temporary files), its writer,
    and the lock of a new one (a resumed one was locked before its checkpoint was read)."""
    lock = None
    if resume:
        run_dir = Path(resume)
        remove_stale_temp_files(run_dir)
    else:
        run_dir = create_run_dir(cfg.out_dir, cfg.name, prefix="train-")
        lock = RunLock(run_dir).acquire()
    try:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    except BaseException:
        if not resume:  # nothing of this run was saved: leave no directory behind
            if lock is not None:
                lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return RunWriter(run_dir, cfg, device, dist.world), lock


def _record_end(exc: BaseException, writer: RunWriter | None) -> RunInterrupted | None:
    """After training ended by `exc`: the run directory marked interrupted (a stop signal; or, once one arrived,
    whatever it broke, such as a collective whose peer rank stopped first) or failed. Returns what to raise
    instead of `exc`, or None to re-raise it."""
    stopped = isinstance(exc, KeyboardInterrupt) or signals.received() is not None
    signum = signals.signum_of(exc)
    if writer is None:
        return RunInterrupted(None, signum) if stopped else None
    if not stopped:
        writer.fail(exc)
        return None
    writer.flush(status="interrupted", interrupted_by=signal.Signals(signum).name)
    writer.write_plot()
    return RunInterrupted(str(writer.run_dir), signum)
