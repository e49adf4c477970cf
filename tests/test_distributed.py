"""DDP under torchrun on CPU with gloo: the same curve as one process, rank 0 writes, failures end the job."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, mnist_args

pytestmark = pytest.mark.slow  # every test here starts torchrun and its processes

HELPERS = Path(__file__).parent / "helpers"
# Two processes average the gradients of two half-batches; one process sums the whole batch at once. Both are
# exact up to float32 summation order. A sum of n float32 terms in another order differs by at most n * u relative
# (u = 2**-24, the unit roundoff), so one step's gradient differs by at most batch * u. Over the steps taken, with
# the loss contracting (no amplification), the curves differ by at most steps * batch * u, plus n_val * u for the
# validation sum itself. The tiny-MNIST run below: 4 epochs x 8 steps of 32, 60 validation images.
UNIT_ROUNDOFF = 2.0**-24
REL_TOL = (4 * 8 * 32 + 60) * UNIT_ROUNDOFF  # about 6.5e-5
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torch splits parallel sums by thread: both sides get one thread per process


def torchrun(*args, cwd, nproc=2, script=None, timeout=240):
    target = [str(script)] if script else ["-m", "optcli"]
    env = {**os.environ, **ONE_THREAD, "COLUMNS": "100"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if x[key] is not None:
                assert y[key] == pytest.approx(x[key], rel=REL_TOL), (key, x, y)


def test_two_gloo_processes_give_the_one_process_curve(tiny_mnist, tmp_path):
    # 240 training images in batches of 32: the last batch of 16 splits 8 + 8; 300 * 0.2 = 60 validation images
    args = mnist_args(tiny_mnist, "--set", "train.epochs=4", "--set", "model.dropout=0")
    one = subprocess.Popen(  # side by side with the torchrun job: most of each process's time is importing torch
        [sys.executable, "-m", "optcli", "train", *args, "--set", "name=one"],
        cwd=tmp_path,
        env={**os.environ, **ONE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    two = torchrun("train", *args, "--set", "name=two", cwd=tmp_path)
    out, _ = one.communicate(timeout=240)
    assert one.returncode == 0, out
    assert two.returncode == 0, two.stdout + two.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"]  # rank 1 wrote nothing
    assert two.stdout.count("Per-epoch metrics") == 1  # and printed nothing
    assert_same_curve(rows(tmp_path / "runs" / "one"), rows(tmp_path / "runs" / "two"))
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    one_summary = json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(one_summary["test_accuracy"], abs=1e-9)


def test_regression_sum_reduction_and_resume_across_process_counts(tmp_path):
    args = [
        "--set",
        "train.epochs=3",
        "--set",
        "data.samples=96",
        "--set",
        "data.batch_size=32",
        "--set",
        "data.val_fraction=0.25",
    ]
    assert cli("train", *args, "--set", "name=one", "--set", "train.epochs=6").exit_code == 0
    two = torchrun("train", *args, "--set", "name=two", cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    # a DDP checkpoint resumes in one process, and the curve goes on as if it had been one run
    result = cli("train", "--resume", tmp_path / "runs" / "two", "--set", "train.epochs=6")
    assert result.exit_code == 0, result.output
    assert_same_curve(rows(tmp_path / "runs" / "one"), rows(tmp_path / "runs" / "two"))


def test_world_size_that_does_not_divide_the_batch_is_a_clear_error(tmp_path):
    out = torchrun("train", "--set", "data.batch_size=63", "--set", "train.epochs=2", cwd=tmp_path)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "data.batch_size: 63 is not divisible by the torchrun world size 2" in text
    assert "Traceback" not in out.stdout
    assert not (tmp_path / "runs").exists()


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    started = time.monotonic()
    out = torchrun(
        "train",
        "--set",
        "train.epochs=50",
        "--set",
        "data.samples=512",
        "--set",
        "data.batch_size=64",
        cwd=tmp_path,
        script=HELPERS / "failing_rank.py",
        timeout=180,
    )
    elapsed = time.monotonic() - started
    assert out.returncode != 0
    assert "rank 1 failed on purpose in epoch 2" in out.stdout + out.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
