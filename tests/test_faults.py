"""Faults: SIGKILL at any moment, exact resume, concurrent runs, and files that try to run code. Ctrl-C and the
other stop signals: test_reliability.py."""

import csv
import json
import os
import pickle
import random
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


def wait_for_a_write(path: Path, proc, after: tuple[int, int] | None, timeout: float = 90.0) -> tuple[int, int]:
    """Until `path` is (re)written by `proc`: os.replace gives it a new inode. Returns its (inode, mtime)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = path.stat()
            now = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            now = None
        if now is not None and now != after:
            return now
        assert time.monotonic() < deadline and proc.poll() is None, f"{path} was not written"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_whole_files_and_resume_is_exact(tmp_path):
    args = [
        "--set",
        "model.dropout=0.2",
        "--set",
        "scheduler={name: exponentiallr, gamma: 0.999}",
        "--set",
        "data.samples=80",  # one batch of 64 per epoch: many short epochs, many moments to be killed at
    ]
    rng = random.Random(0)
    proc = start(*args, "--set", "train.epochs=100000", "--set", "name=killed", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "killed"
    written = None
    for moment in range(3):  # kill, check, resume, kill again: three moments, each while the process trains
        written = wait_for_a_write(run_dir / "last.pt", proc, written)
        time.sleep(rng.uniform(0.2, 1.2))  # anywhere in the cycle of one checkpoint a second, mid-write included
        proc.kill()
        proc.wait(timeout=30)
        done = assert_run_dir_is_whole(run_dir)
        written = (run_dir / "last.pt").stat().st_ino, (run_dir / "last.pt").stat().st_mtime_ns
        if moment < 2:
            proc = subprocess.Popen(
                [sys.executable, "-m", "optcli", "train", "--resume", str(run_dir)],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    # the end: the killed run resumed to `done + 20` epochs against one uninterrupted run of as many, side by side
    # (processes of their own, like the killed run); fewer epochs than asked at the start is what a resume allows
    epochs = ["--set", f"train.epochs={done + 20}"]
    whole = start(*args, *epochs, "--set", "name=whole", cwd=tmp_path)
    resumed = start("--resume", str(run_dir), *epochs, cwd=tmp_path)
    for p in (whole, resumed):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    assert not list(run_dir.glob(".*.tmp"))
    a = load_checkpoint(tmp_path / "runs" / "whole" / "last.pt")
    b = load_checkpoint(run_dir / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit
    assert a["history"]["epochs"][-1]["train_loss"] == b["history"]["epochs"][-1]["train_loss"]
    assert len(b["history"]["epochs"]) == done + 20


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
    procs = [start("--set", "train.epochs=1", "--set", "name=twin", cwd=tmp_path) for _ in range(2)]
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
