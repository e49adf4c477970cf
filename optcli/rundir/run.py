"""One training run from a Config: check everything, build data, model and optimizer, fit, and keep the
run directory up to date (config.yaml, metrics.csv, metrics.jsonl, summary.json, last.pt)."""

from __future__ import annotations

import copy
import inspect
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from optcli.config import Config, load_config, to_yaml
from optcli.engine import distributed
from optcli.engine.build import build_model_and_optimizer, torch_settings
from optcli.engine.distributed import SINGLE, Dist
from optcli.engine.dynamics import epoch_callbacks
from optcli.engine.loop import History, Training, check_closure_settings, check_precision, fit, grad_scaler
from optcli.engine.model import check_model_config, resolve_device
from optcli.engine.optimizers import (
    SCHEDULE_LENGTH_KWARGS,
    check_optimizer,
    check_scheduler,
    needs_closure,
    resolve_optimizer,
    scheduler_classes,
    signature_defaults,
)
from optcli.errors import RunInterrupted, SystemRefused, UserError
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
from optcli.rundir.loggers import check_loggers, make_loggers
from optcli.rundir.provenance import provenance
from optcli.rundir.schema import FORMAT_VERSION
from optcli.tasks import load_data
from optcli.tasks.registry import describe_task
from optcli.tasks.regression import loss_floor

CHECKPOINT_INTERVAL_S = 1.0  # last.pt is rewritten at most this often (and always after the final epoch)
# what may change on --resume without changing what the saved state means: where the files go, how the run is
# displayed or compiled, and train.epochs (more of them, unless a scheduler's length was sized from it)
RESUMABLE_KEYS = ("name", "out_dir", "device", "train.epochs", "train.log_every", "train.compile")


@dataclass
class TrainResult:
    run_dir: Path | None  # None on the ranks of a torchrun job other than 0, which write nothing
    history: History
    summary: dict
    start_epoch: int  # 1, or the epoch a resumed run continued from
    primary: bool = True  # rank 0 (or the only process): the one that prints


def preflight(cfg: Config, dist: Dist = SINGLE) -> torch.device:
    """Every check that needs torch, done before any data is loaded or any file is written."""
    check_model_config(cfg)
    check_optimizer(cfg.optimizer)
    check_closure_settings(resolve_optimizer(cfg.optimizer.name), cfg.train.accumulate)
    check_scheduler(cfg.scheduler, cfg.train.epochs)
    check_loggers(cfg)
    if dist.enabled:
        if cfg.data.batch_size % dist.world:
            raise UserError(
                f"data.batch_size: {cfg.data.batch_size} is not divisible by the torchrun world size "
                f"{dist.world}; each rank takes an equal shard of every batch"
            )
        if needs_closure(resolve_optimizer(cfg.optimizer.name)):
            raise UserError(
                f"optimizer: {cfg.optimizer.name} re-evaluates the loss in step() and is not supported "
                f"under torchrun; run it in one process"
            )
    device = resolve_device(cfg.device)
    check_precision(cfg.train.precision, device, uses_closure=needs_closure(resolve_optimizer(cfg.optimizer.name)))
    return device


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

    def epoch_done(self, history: History, model, optimizer, scheduler, scaler=None, force: bool = False) -> None:
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

    def write_plot(self, history: History | None = None) -> None:
        """loss.png next to the metrics: train and validation loss, accuracy, lr."""
        from optcli.report.plots import save_run_plot  # matplotlib only once a run has something to draw

        history = history or self.history
        if history.epochs:
            save_run_plot(history, self.run_dir / "loss.png")
        from optcli.report.html import report_after_run

        report_after_run(self.run_dir)  # after summary.json is whole; when it fails the CLI says there is none

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
        device = distributed.init(dist, preflight(cfg, dist))
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
    checkpoint = load_checkpoint(Path(resume) / "last.pt") if resume else None
    if checkpoint is not None:
        check_resume(checkpoint, cfg, str(resume))  # before anything is written
    data = load_data(cfg.data, device)
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, device)
    scaler = grad_scaler(cfg.train.precision, device)  # its loss scale is part of the state of a float16 run
    history = (
        _restore(checkpoint, model, optimizer, scheduler, scaler, str(resume)) if checkpoint is not None else History()
    )
    train_model = model
    if dist.enabled:  # the checkpoint keeps the unwrapped model, so DDP and single-process runs resume each other
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    start_epoch = len(history.epochs) + 1
    writer = None
    lock = None
    if dist.primary:
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
        writer = RunWriter(run_dir, cfg, device, dist.world)
        if on_start is not None:
            on_start(run_dir, start_epoch, data)
    else:
        on_epoch = on_batch = None

    callbacks = epoch_callbacks(cfg, model, optimizer)
    if writer is not None:
        callbacks += make_loggers(cfg, writer.run_dir, n_train=len(data.train))

    def epoch_done(h: History) -> None:
        if writer is not None:
            writer.epoch_done(
                h,
                model,
                optimizer,
                scheduler,
                scaler,
                force=h.status == "diverged" or len(h.epochs) == cfg.train.epochs,
            )
        if on_epoch is not None:
            on_epoch(h)

    started = time.perf_counter()
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
            writer.write_plot(history)
    except BaseException as exc:
        # a stop signal; or, once one arrived, whatever it broke (a collective whose peer rank stopped first)
        stopped = isinstance(exc, KeyboardInterrupt) or signals.received() is not None
        signum = signals.signum_of(exc)
        if writer is None:
            if stopped:
                raise RunInterrupted(None, signum) from None
            raise
        if not stopped:
            writer.fail(exc)
            raise
        writer.flush(status="interrupted", interrupted_by=signal.Signals(signum).name)
        writer.write_plot()
        raise RunInterrupted(str(writer.run_dir), signum) from None
    finally:
        for callback in callbacks:
            callback.close()
        if lock is not None:
            lock.release()
    summary = summarize(cfg, history, device=device, seconds=time.perf_counter() - started, world=dist.world)
    return TrainResult(writer.run_dir if writer else None, history, summary, start_epoch, dist.primary)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _schedule_sized_from_epochs(cfg: Config) -> bool:
    if cfg.scheduler is None:
        return False
    cls = scheduler_classes().get(cfg.scheduler.name.lower())
    if cls is None:
        return False
    defaults = signature_defaults(cls)
    return any(
        k in defaults and k not in cfg.scheduler.kwargs and defaults[k] in (inspect.Parameter.empty, None)
        for k in SCHEDULE_LENGTH_KWARGS
    )


def check_resume(checkpoint: dict, cfg: Config, run_dir: str) -> None:
    """A resumed run goes on with the config it was saved with: only RESUMABLE_KEYS may differ (a config.yaml
    edited on disk counts), and train.epochs only upwards and only when no schedule was sized from it."""
    missing = object()
    old, new = _flatten(checkpoint["config"]), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    done = len(checkpoint["history"]["epochs"])
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    why = ""
    if "train.epochs" in changed and _schedule_sized_from_epochs(cfg):
        refused.append("train.epochs")
        why = f"; scheduler {cfg.scheduler.name if cfg.scheduler else ''} was sized from train.epochs"
    if refused:
        parts = "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(refused))
        raise UserError(
            f"--resume {run_dir}: would change what the saved state means ({parts}){why}; only "
            f"{', '.join(RESUMABLE_KEYS)} may change on resume: start a new run instead"
        )
    if cfg.train.epochs < done:
        raise UserError(
            f"--resume {run_dir}: train.epochs: {cfg.train.epochs} is fewer than the {done} epochs already trained"
        )


def _restore(checkpoint: dict, model, optimizer, scheduler, scaler: torch.amp.GradScaler, resume: str) -> History:
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        history = History.from_dict(checkpoint["history"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(
            f"{resume}: the checkpoint does not fit this config ({str(exc).splitlines()[0][:200]})"
        ) from None
    history.status = "running"
    return history


def resume_config(run_dir: str, overrides: list[str]) -> Config:
    """The config a run was started with (its config.yaml), with --set overrides such as train.epochs=30."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UserError(f"--resume {run_dir}: no such run directory")
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml in it; not a run directory")
    return load_config(path, overrides)
