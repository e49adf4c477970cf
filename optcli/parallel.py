"""Independent (optimizer, seed) trials in separate processes on one machine.

Each worker loads the data once and runs whole trials; threads per worker are set so that
workers x threads does not exceed the cores. A trial's result depends only on (config, spec, seed)
and on torch's thread count (parallel sums are split by thread), so a serial run with the same
--threads gives bit-identical results.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

from optcli.config import Config

_worker: dict = {}


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _init_worker(cfg_json: dict, threads: int) -> None:
    import torch

    from optcli.config import Config
    from optcli.data import load_data
    from optcli.model import resolve_device

    cfg = Config.model_validate(cfg_json)
    # before any parallel work, so that the thread pool inherits it; a worker lives for one comparison only
    torch.set_flush_denormal(cfg.train.flush_denormal)
    torch.set_num_threads(threads)
    _worker["cfg"] = cfg
    _worker["data"] = load_data(cfg.data, resolve_device(cfg.device))


def _run(spec, seed: int):
    from optcli.compare import run_trial

    return run_trial(_worker["cfg"], _worker["data"], spec, seed)


class ParallelRunner:
    def __init__(self, cfg: Config, jobs: int, threads: Optional[int] = None, on_trial_done: Optional[Callable] = None):
        self.on_trial_done = on_trial_done
        # spawn, not fork: a forked child of a process that has started torch's thread pools can hang
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(cfg.model_dump(mode="json"), threads or threads_per_job(jobs)))

    def __call__(self, plan: list) -> list:
        futures = [self.pool.submit(_run, spec, seed) for spec, seed in plan]
        results = []
        for (spec, seed), future in zip(plan, futures):
            results.append(future.result())
            if self.on_trial_done:
                self.on_trial_done(spec.label, seed, results[-1])
        return results

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
