"""compare --backend ray on a local Ray instance of 2 CPUs: the same trials, files and verdict as a serial run."""

from __future__ import annotations

import json
import time

import pytest

from optcli.compare.comparison import parse_specs, run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.runners import (
    CANCEL_TRIES,
    CANCEL_WAIT_SECONDS,
    RayRunner,
    TrialCallbacks,
    TrialsInterrupted,
    _cancel,
)
from optcli.config import load_config
from optcli.errors import UserError
from tests.conftest import cli

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starting Ray takes several seconds

SETS = ["train.epochs=4", "data.samples=32", "data.batch_size=16"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_trials_equal_a_serial_run_with_one_thread(local_ray):
    cfg = load_config(None, SETS)
    specs = ["sgd:lr=0.001,momentum=0.9", "adam:lr=0.01", "rmsprop:lr=0.001"]
    serial = run_comparison(cfg, specs, CompareOptions(seeds=2, threads=1))
    on_ray = run_comparison(
        cfg, specs, CompareOptions(seeds=2, backend="ray")
    )  # 1 CPU per task: one torch thread, as serial
    # bit-identical: each trial runs the same operations on one thread in either process
    assert [(t.label, t.seed, t.history.to_dict()["epochs"]) for t in on_ray.trials] != []
    for a, b in zip(on_ray.trials, serial.trials, strict=True):
        assert (a.label, a.seed, a.history.status) == (b.label, b.seed, b.history.status)
        assert [(e.train_loss, e.val_loss, e.lr) for e in a.history.epochs] == [
            (e.train_loss, e.val_loss, e.lr) for e in b.history.epochs
        ]
    assert on_ray.verdicts == serial.verdicts
    summary = json.loads((__import__("pathlib").Path(on_ray.run_dir) / "summary.json").read_text())
    assert len(summary["trials"]) == 6 and summary["rows"][0]["status"] == "completed"


def test_data_missing_on_the_workers_is_the_serial_paths_line(local_ray, tmp_path):
    # MNIST missing: the workers' UserError is raised here, as the serial path raises it, before any file is made
    cfg = load_config(
        None, ["data.name=mnist", f"data.root={tmp_path}/none", "data.download=false", "train.loss=cross_entropy"]
    )
    with pytest.raises(UserError, match=r"^data: MNIST not found in .*/none/MNIST/raw"):
        run_comparison(cfg, ["adam"], CompareOptions(seeds=1, backend="ray"))
    assert not (tmp_path / "runs").exists()


def test_an_interruption_cancels_the_pending_tasks(local_ray):
    # one trial diverges in its first epoch, the others need minutes: none but it can finish between the
    # interruption and the cancellation (with equal trials, the one running beside the first done could)
    cfg = load_config(None, ["train.epochs=100000", "data.samples=32"])
    fast, *slow = parse_specs(["sgd:lr=1e30", "adam", "rmsprop", "adagrad"])
    plan = [(fast, 0)] + [(spec, seed) for seed in range(3) for spec in slow]
    finished, stopped = [], []

    def stop(label, seed, history):
        finished.append((label, history.status))
        stopped.append(time.monotonic())
        raise KeyboardInterrupt

    runner = RayRunner(cfg, callbacks=TrialCallbacks(on_trial_done=stop))
    with pytest.raises(TrialsInterrupted) as info:
        runner.run(plan)
    # the cancels and the waits for them are bounded: an interruption takes seconds, however the cancels went
    assert time.monotonic() - stopped[0] < CANCEL_TRIES * CANCEL_WAIT_SECONDS + 5
    assert finished == [(fast.label, "diverged")]
    assert [h.status for h in info.value.histories].count("interrupted") == len(plan) - 1
    assert len(runner.cancelled) == len(plan) - 1
    for ref in runner.cancelled:  # each task ended: a cancel lost to a race with its lease was made again
        with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
            ray.get(ref, timeout=30)


def test_a_lost_cancel_is_made_again(monkeypatch):
    calls = []

    class FakeRay:
        """A Ray whose first cancel of task "b" is lost (it raced the lease): b has not ended after the wait."""

        def cancel(self, ref, force):
            calls.append(ref)

        def wait(self, refs, num_returns, timeout, fetch_local):
            ended = [r for r in refs if r != "b" or calls.count("b") > 1]
            return ended, [r for r in refs if r not in ended]

    _cancel(FakeRay(), ["a", "b", "c"])
    assert calls == ["a", "b", "c", "b"]  # then b ended: no third try


def test_cli_backend_ray(local_ray):
    result = cli("compare", "sgd", "adam", "--backend", "ray", "--epochs", "2", "--set", "data.samples=16")
    assert result.exit_code == 0, result.output
    assert "Verdict" in result.output
    result = cli("compare", "sgd", "--backend", "ray", "--jobs", "2")
    assert result.exit_code == 2 and "--jobs" in result.output
