"""One trial (an optimizer spec trained from one seed) and the runners that execute many of them.

Every runner has the same interface: `run(plan)` takes (spec, seed) pairs and returns their histories in plan
order; `close()` releases what it holds (it is a context manager). A stop signal (Ctrl-C, SIGTERM, ...; see
signals.py) during `run` ends every trial under way, workers included, and raises TrialsInterrupted with the
histories in plan order: the finished ones as they are, the others marked `interrupted`.

A trial's result depends only on (config, spec, seed) and on torch's thread count (parallel sums are split by
thread), so runners with the same threads per trial give bit-identical results.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optcli.config import Config
from optcli.engine.build import build_model_and_optimizer, seed_torch, set_torch_settings, torch_settings
from optcli.engine.dynamics import epoch_callbacks
from optcli.engine.loop import History, Training, fit
from optcli.engine.optimizers import OptimizerSpec
from optcli.errors import UserError
from optcli.rundir import signals
from optcli.tasks import Data

if TYPE_CHECKING:
    import torch


Plan = list[tuple[OptimizerSpec, int]]


class TrialsInterrupted(Exception):
    """A stop signal ended a plan: `histories` in plan order, unfinished trials with status `interrupted`."""

    def __init__(self, histories: list[History], signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.histories, self.signum = histories, signum


def _interrupted(done: dict[int, History], plan: Plan, exc: BaseException) -> TrialsInterrupted:
    histories = [done.get(i) or History(status="interrupted") for i in range(len(plan))]
    return TrialsInterrupted(histories, signals.signum_of(exc))


@dataclass
class TrialCallbacks:
    """Progress hooks; the runners call them from the driving process only."""

    on_trial_start: Callable[[str, int], None] | None = None
    on_trial_done: Callable[[str, int, History], None] | None = None
    on_epoch: Callable[[History], None] | None = None


def run_trial(
    cfg: Config, data: Data, spec: OptimizerSpec, seed: int, *, on_epoch: Callable[[History], None] | None = None
) -> History:
    """One (optimizer, seed) run. The initial weights, the batch order and the dropout masks are functions of
    the seed alone, so every optimizer of a seed starts from the same point, in any process."""
    cfg = cfg.model_copy(update={"seed": seed, "optimizer": spec.config()})
    model, optimizer, scheduler = build_model_and_optimizer(cfg, data, data.train.x.device)
    seed_torch(seed)  # the same dropout masks for every optimizer of this seed
    callbacks = epoch_callbacks(cfg, model, optimizer)
    try:
        return fit(Training(cfg, model, optimizer, scheduler, data), on_epoch=on_epoch, callbacks=callbacks)
    finally:
        for callback in callbacks:
            callback.close()


class TrialRunner:
    """The interface: run a plan of (spec, seed) trials, return their histories in plan order."""

    def __init__(self, callbacks: TrialCallbacks | None = None):
        self.callbacks = callbacks or TrialCallbacks()

    def run(self, plan: Plan) -> list[History]:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self) -> TrialRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialRunner(TrialRunner):
    """Trials one after another in this process, on data loaded once."""

    def __init__(self, cfg: Config, data: Data, callbacks: TrialCallbacks | None = None):
        super().__init__(callbacks)
        self.cfg, self.data = cfg, data

    def run(self, plan: Plan) -> list[History]:
        cb, done = self.callbacks, {}
        try:
            for i, (spec, seed) in enumerate(plan):
                if cb.on_trial_start:
                    cb.on_trial_start(spec.label, seed)
                done[i] = run_trial(self.cfg, self.data, spec, seed, on_epoch=cb.on_epoch)
                if cb.on_trial_done:
                    cb.on_trial_done(spec.label, seed, done[i])
        except KeyboardInterrupt as exc:  # the epoch under way is abandoned, like a single run's
            raise _interrupted(done, plan, exc) from None
        return [done[i] for i in range(len(plan))]


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


_worker: dict[str, Any] = {}


def _init_worker(cfg_json: dict, threads: int, device: str | None) -> None:
    signals.ignore_in_worker()  # the parent decides when to stop, and ends its workers itself

    import torch

    from optcli.engine.model import resolve_device
    from optcli.tasks import load_data

    cfg = Config.model_validate(cfg_json)
    # before any parallel work, so that the thread pool inherits it; a worker lives for one comparison only
    set_torch_settings(cfg, threads=threads)
    _worker["cfg"] = cfg
    try:
        _worker["data"] = load_data(cfg.data, torch.device(device) if device else resolve_device(cfg.device))
    except UserError as exc:  # raised by the worker's tasks, so that the parent says the line the serial path says
        _worker["error"] = exc  # (an initializer's exception would only break the pool)


def _ready() -> None:
    """A worker's first task: its data loaded, or the error that stopped it (UserError pickles as it is)."""
    if "error" in _worker:
        raise _worker["error"]


def _run_in_worker(spec: OptimizerSpec, seed: int) -> History:
    _ready()
    return run_trial(_worker["cfg"], _worker["data"], spec, seed)


class ProcessPoolRunner(TrialRunner):
    """Trials in `jobs` worker processes on this machine; each worker loads the data once and runs whole
    trials, with threads per worker set so that workers x threads does not exceed the cores."""

    def __init__(
        self,
        cfg: Config,
        *,
        jobs: int,
        threads: int | None = None,
        callbacks: TrialCallbacks | None = None,
        device: torch.device | None = None,
    ):
        """`device`: the torch.device the parent resolved for the comparison (resolved again in each worker when
        None)."""
        super().__init__(callbacks)
        # spawn, not fork: a forked child of a process that has started torch's thread pools can hang
        self.pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(cfg.model_dump(mode="json"), threads or threads_per_job(jobs), str(device) if device else None),
        )
        try:  # every worker started and its data loaded before any file is made: a missing dataset is one line
            with signals.blocked_in_children():
                ready = [self.pool.submit(_ready) for _ in range(jobs)]
            for future in ready:
                future.result()
        except BaseException:
            self.terminate()
            raise

    def run(self, plan: Plan) -> list[History]:
        with signals.blocked_in_children():  # the first submit starts the workers
            futures = [self.pool.submit(_run_in_worker, spec, seed) for spec, seed in plan]
        done: dict[int, History] = {}
        try:
            for i, ((spec, seed), future) in enumerate(zip(plan, futures, strict=True)):
                done[i] = future.result()
                if self.callbacks.on_trial_done:
                    self.callbacks.on_trial_done(spec.label, seed, done[i])
        except KeyboardInterrupt as exc:
            self.terminate()
            finished = {i: f.result() for i, f in enumerate(futures) if i not in done and _finished(f)}
            raise _interrupted({**done, **finished}, plan, exc) from None
        except BaseException:  # a trial's error, raised here as the serial path raises it: the others end now
            self.terminate()
            raise
        return [done[i] for i in range(len(plan))]

    def terminate(self) -> None:
        """End every worker now (SIGTERM, which a worker leaves at its default): a trial under way is abandoned.
        ProcessPoolExecutor has no public way to end workers before Python 3.14's terminate_workers()."""
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def _finished(future: Any) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs optcli[ray]: pip install 'optcli[ray]'") from None
    return ray


_ray_worker: dict[str, Any] = {}
RAY_CONNECT_SECONDS = 10.0  # how long RAY_ADDRESS may take to accept a connection before it is reported


def _ray_trial(cfg_json: dict, spec: OptimizerSpec, seed: int, threads: int) -> History:
    """One trial in a Ray worker: the data are loaded once per worker process and config, as in a pool worker.
    The device is resolved here, on the worker's machine, which may not be the driver's; the worker process may
    run other tasks next, so the torch settings are put back after the trial."""
    cfg = Config.model_validate(cfg_json)
    with torch_settings(cfg, threads=threads):
        return run_trial(cfg, _ray_data(cfg_json), spec, seed)


def _ray_data(cfg_json: dict) -> Data:
    """The data of a config in this Ray worker, loaded once per worker process and config."""
    from optcli.engine.model import resolve_device
    from optcli.tasks import load_data

    cfg = Config.model_validate(cfg_json)
    key = json.dumps([cfg_json["data"], cfg_json["device"]], sort_keys=True)
    if _ray_worker.get("key") != key:
        _ray_worker["data"] = load_data(cfg.data, resolve_device(cfg.device))
        _ray_worker["key"] = key
    return _ray_worker["data"]


def _ray_ready(cfg_json: dict) -> None:
    """A Ray worker loads the data before any trial: a dataset that is not there is the serial path's one line."""
    _ray_data(cfg_json)


def check_ray_address(address: str | None) -> None:
    """RAY_ADDRESS host:port where nothing answers is one line within seconds (ray.init would wait for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS={address}: expected host:port (or ray://host:port, auto)")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_SECONDS).close()
    except OSError as exc:
        raise UserError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "unset RAY_ADDRESS to start a local Ray"
        ) from None


def _user_error(ray: Any, exc: BaseException) -> UserError | None:
    """The UserError a Ray task raised (a dataset not there, ...), to raise here as the serial path does."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, UserError) else None


class RayRunner(TrialRunner):
    """Every trial a Ray task asking for `threads` CPUs (and a GPU when the config trains on CUDA), on the cluster
    that RAY_ADDRESS names, a Ray instance this process already joined, or a local one started here. Results come
    back to this process, which writes the run directory. A task that fails or whose worker is lost is retried
    once, then its trial is marked failed; Ctrl-C or SIGTERM cancels the tasks still pending."""

    def __init__(self, cfg: Config, *, threads: int | None = None, callbacks: TrialCallbacks | None = None):
        super().__init__(callbacks)
        self.ray = import_ray()
        self.started = not self.ray.is_initialized()
        if self.started:  # joins RAY_ADDRESS when it is set, else starts a local instance on this machine's cores
            check_ray_address(os.environ.get("RAY_ADDRESS"))
            self.ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.cfg_json = cfg.model_dump(mode="json")
        self.threads = threads or 1
        self.cancelled: list = []  # the tasks cancelled by an interruption
        try:
            gpus = cfg.device.startswith("cuda") or (
                cfg.device == "auto" and self.ray.cluster_resources().get("GPU", 0) > 0
            )
            resources = {"num_cpus": self.threads, "num_gpus": 1 if gpus else 0}
            self.task = self.ray.remote(_ray_trial).options(**resources, max_retries=1, retry_exceptions=True)
            self.ray.get(self.ray.remote(_ray_ready).options(**resources, max_retries=0).remote(self.cfg_json))
        except BaseException as exc:
            self.close()
            if (error := _user_error(self.ray, exc)) is not None:
                raise error from None
            raise

    def run(self, plan: Plan) -> list[History]:
        ray = self.ray
        refs = [self.task.remote(self.cfg_json, spec, seed, self.threads) for spec, seed in plan]
        pending = {ref: i for i, ref in enumerate(refs)}
        results: list[History | None] = [None] * len(plan)
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)  # so that SIGTERM cancels the tasks as Ctrl-C does
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    history = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # failed twice, or its worker or node lost twice
                    if (error := _user_error(ray, exc)) is not None:
                        raise error from None  # the others are cancelled below
                    history = History(status="failed", error=_first_line(exc))
                results[i] = history
                spec, seed = plan[i]
                if self.callbacks.on_trial_done:
                    self.callbacks.on_trial_done(spec.label, seed, history)
        except BaseException as exc:
            self.cancelled = list(pending)
            _cancel(ray, self.cancelled)
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or a stop signal: keep the finished trials
                done_trials = {i: h for i, h in enumerate(results) if h is not None}
                raise _interrupted(done_trials, plan, exc) from None
            raise
        finally:
            if signal.getsignal(signal.SIGTERM) is _raise_interrupt:
                signal.signal(signal.SIGTERM, previous)
        return [h for h in results if h is not None]

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


CANCEL_TRIES = 3  # a cancel that races a task's lease can be lost (Ray drops it): the task is cancelled again
CANCEL_WAIT_SECONDS = 2.0  # how long each try waits for the cancelled tasks to end


def _cancel(ray: Any, refs: list) -> None:
    """Cancel `refs` (force: their workers are killed) and wait up to CANCEL_WAIT_SECONDS for them to end; the
    ones still not ended are cancelled again, at most CANCEL_TRIES times in all, so that the interruption stays
    within seconds and a task on an external cluster does not keep training."""
    left = list(refs)
    for _ in range(CANCEL_TRIES):
        if not left:
            return
        for ref in left:
            ray.cancel(ref, force=True)
        _, left = ray.wait(left, num_returns=len(left), timeout=CANCEL_WAIT_SECONDS, fetch_local=False)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the task's own exception
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]
