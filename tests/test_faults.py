"""Faults: Ctrl-C, SIGKILL at any moment, exact resume, concurrent runs, and files that try to run code."""

import csv
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from optcli.rundir.files import create_run_dir, load_checkpoint
from tests.conftest import cli


def start(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}
    return subprocess.Popen(
        [sys.executable, "-m", "optcli", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def assert_run_dir_is_whole(run_dir: Path) -> int:
    """Every file under its final name parses, and the checkpoint and metrics describe the same epoch."""
    yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    csv_rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert len(rows) == len(csv_rows) == summary["epochs_completed"] == len(ckpt["history"]["epochs"])
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    return len(rows)


@pytest.mark.slow
def test_ctrl_c_saves_the_last_completed_epoch_and_exits_130(tmp_path):
    proc = start("--set", "train.epochs=100000", "--set", "name=r", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    wait_for(run_dir / "last.pt")
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    done = assert_run_dir_is_whole(run_dir)
    assert 0 < done < 100000
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    result = cli("train", "--resume", run_dir, "--set", f"train.epochs={done + 3}")
    assert result.exit_code == 0, result.output
    assert assert_run_dir_is_whole(run_dir) == done + 3


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_whole_files_and_resume_is_exact(tmp_path):
    epochs = 1500
    args = [
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "model.dropout=0.2",
        "--set",
        "scheduler={name: exponentiallr, gamma: 0.999}",
        "--set",
        "data.samples=80",  # one batch of 64 per epoch: many short epochs, many moments to be killed at
    ]
    whole = start(*args, "--set", "name=whole", cwd=tmp_path)  # a process of its own, like the killed run
    assert whole.wait(timeout=120) == 0
    rng = random.Random(0)
    proc = start(*args, "--set", "name=killed", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "killed"
    for _ in range(3):  # kill, check, resume, kill again: three moments
        wait_for(run_dir / "last.pt")
        time.sleep(rng.uniform(0.2, 1.2))
        proc.kill()
        proc.wait(timeout=30)
        done = assert_run_dir_is_whole(run_dir)
        assert done < epochs, "the run finished before it was killed; give it more epochs"
        proc = subprocess.Popen(
            [sys.executable, "-m", "optcli", "train", "--resume", str(run_dir)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
    assert proc.wait(timeout=120) == 0
    assert not list(run_dir.glob(".*.tmp"))
    a = load_checkpoint(tmp_path / "runs" / "whole" / "last.pt")
    b = load_checkpoint(run_dir / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit
    assert a["history"]["epochs"][-1]["train_loss"] == b["history"]["epochs"][-1]["train_loss"]


def test_two_runs_started_at_once_never_share_a_directory(tmp_path):
    made, barrier = [], threading.Barrier(8)

    def go():
        barrier.wait()
        made.append(create_run_dir(tmp_path / "runs", "same"))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)


@pytest.mark.slow
def test_two_processes_with_the_same_name_get_two_directories(tmp_path):
    procs = [start("--set", "train.epochs=3", "--set", "name=twin", cwd=tmp_path) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == ["twin", "twin-2"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"model": RunsCode(marker), "config": {}}, f)
    result = cli("inspect-params", "--checkpoint", evil)
    assert result.exit_code == 2 and "refused" in result.output and "Traceback" not in result.output
    assert cli("train", "--set", "train.epochs=2", "--set", "name=r").exit_code == 0
    (tmp_path / "runs" / "r" / "last.pt").write_bytes(evil.read_bytes())
    result = cli("train", "--resume", tmp_path / "runs" / "r")
    assert result.exit_code == 2 and "refused" in result.output
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the trap is armed: plain pickle runs it
    assert marker.exists()


def test_a_yaml_tag_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "c.yaml"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    result = cli("train", "--config", path)
    assert result.exit_code == 2 and "constructor for the tag" in result.output
    assert not marker.exists()
