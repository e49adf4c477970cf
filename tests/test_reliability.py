"""Reliability II: every way a run ends is a clean end, resume is guarded, no input can hang, exhaust or corrupt.

Read-only directories: the tests run as root, for whom chmod proves nothing, so a read-only directory is made
immutable with `chattr +i` (skipped where chattr is refused); a full disk is `os.replace` raising ENOSPC, and a full
stdout is the real /dev/full."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from optcli.rundir import signals
from optcli.rundir.files import RunLock, load_checkpoint
from tests.conftest import cli

SHORT = [
    "--set",
    "train.epochs=2",
    "--set",
    "data.samples=32",
    "--set",
    "data.inputs=20",
    "--set",
    "data.val_fraction=0",
]


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as JavaScript and jq do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def train(name: str, *extra: str):
    result = cli("train", *SHORT, "--set", f"name={name}", *extra)
    assert result.exit_code == 0, result.output
    return Path("runs") / name


def assert_one_line_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- 1. resume is guarded by a lock ---------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_stale_lock_is_taken_over(tmp_path):
    run_dir = train("r")
    with RunLock(run_dir):  # flock conflicts between open files even within one process: a second writer
        before = (run_dir / "summary.json").read_bytes()
        result = cli("train", "--resume", run_dir, "--set", "train.epochs=3")
        assert_one_line_error(result, 1, str(run_dir), f"pid {os.getpid()}")
        assert (run_dir / "summary.json").read_bytes() == before
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / ".lock").write_text(f"{dead.pid}\n")  # left by a killed process: its flock died with it
    assert cli("train", "--resume", run_dir, "--set", "train.epochs=3").exit_code == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 3


@pytest.mark.slow
def test_two_resumes_at_once_one_runs_the_other_is_refused(tmp_path):
    run_dir = train("r")
    env = {**os.environ, "COLUMNS": "100"}
    cmd = [sys.executable, "-m", "optcli", "train", "--resume", str(run_dir), "--set", "train.epochs=100000"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while (run_dir / ".lock").read_text().strip() != str(first.pid):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    # the second in this process: the lock is an flock, refused between processes as between open files
    second = cli("train", "--resume", run_dir, "--set", "train.epochs=100000")
    assert second.exit_code == 1
    assert f"error: {run_dir}: in use by another optcli process (pid {first.pid})" in second.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM
    load_checkpoint(run_dir)  # whole


# --- 2. resume never changes the run behind the user's back ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (["--set", "optimizer.lr=0.5"], "optimizer.lr: '(absent)' -> 0.5"),
        (["--set", "optimizer.name=sgd"], "optimizer.name: 'adam' -> 'sgd'"),
        (["--set", "data.seed=7"], "data.seed: 0 -> 7"),
        (["--set", "train.epochs=1"], "train.epochs: 1 is fewer than the 2 epochs already trained"),
    ],
)
def test_resume_refuses_changes_that_change_what_the_state_means_and_writes_nothing(tmp_path, change, fragment):
    run_dir = train("r")
    files = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = cli("train", "--resume", run_dir, *change)
    assert_one_line_error(result, 2, f"--resume {run_dir}", fragment)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files


def test_resume_refuses_a_config_yaml_edited_on_disk(tmp_path):
    run_dir = train("r")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["optimizer"]["lr"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(cli("train", "--resume", run_dir), 2, "optimizer.lr: '(absent)' -> 0.5")


def test_more_epochs_resume_but_not_when_a_schedule_was_sized_from_them(tmp_path):
    assert cli("train", "--resume", train("plain"), "--set", "train.epochs=3").exit_code == 0
    run_dir = train("cosine", "--set", "scheduler={name: cosineannealinglr}")
    result = cli("train", "--resume", run_dir, "--set", "train.epochs=4")
    assert_one_line_error(result, 2, "train.epochs: 2 -> 4", "scheduler cosineannealinglr was sized from train.epochs")


# --- 3. every signal that ends a run ends it like Ctrl-C ------------------------------------------------------


def test_stop_signals_raise_stopped_and_are_held_while_files_are_written():
    before = signal.getsignal(signal.SIGTERM)  # not SIG_DFL once an earlier test has started Ray in this process
    with signals.stop_on_signals():
        with pytest.raises(signals.Stopped) as caught:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        assert caught.value.signum == signal.SIGUSR1
    with signals.stop_on_signals():
        with pytest.raises(signals.Stopped) as caught:
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                written = True  # reached: the signal waited for the end of the held section
        assert written and caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # put back


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped Stopped, by design
def test_a_stop_dropped_inside_a_finalizer_is_raised_at_the_next_training_step():
    from optcli.config import load_config
    from optcli.engine.build import build_model_and_optimizer
    from optcli.engine.loop import make_loss, train_one_epoch
    from optcli.engine.stepping import PlainStep, StepSettings
    from optcli.tasks import load_data

    class SignalsInDel:  # a stop landing while Python runs a finalizer: the Stopped it raises is printed and dropped
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside __del__

    cfg = load_config(None, ["data.samples=64", "data.batch_size=8"])
    data = load_data(cfg.data, torch.device("cpu"))
    model, optimizer, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    step = PlainStep(model, optimizer, make_loss(cfg), StepSettings.of(cfg))
    seen = []

    def batches():
        for i in range(6):
            seen.append(i)
            if i == 2:
                SignalsInDel()  # deleted at once
            yield data.train.x[i * 8 : (i + 1) * 8], data.train.y[i * 8 : (i + 1) * 8]

    with signals.stop_on_signals():
        with pytest.raises(signals.Stopped) as caught:
            train_one_epoch(step, batches(), n_batches=6)
    assert caught.value.signum == signal.SIGTERM and seen == [0, 1, 2]  # not one step after the stop


_SIGNAL_STATE = """
import json, signal
from optcli.rundir import signals
def state():
    handler = signal.getsignal(signal.SIGINT)
    return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])), handler == signal.SIG_IGN
before = state()
signals.ignore_in_worker()
print(json.dumps([before, state()]))
"""


def test_a_worker_starts_with_the_stop_signals_blocked_until_it_ignores_them():
    # a Ctrl-C reaching the process group while a pool worker still imports torch must not print its traceback
    with signals.blocked_in_children():
        out = subprocess.run([sys.executable, "-c", _SIGNAL_STATE], capture_output=True, text=True, check=True).stdout
    (blocked, ignored), (blocked_after, ignored_after) = json.loads(out)
    stop = {int(s) for s in signals.STOP_SIGNALS}
    assert set(blocked) & stop == stop - {signal.SIGTERM} and not ignored  # SIGTERM open: the parent ends workers so
    assert not set(blocked_after) & stop and ignored_after
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this process's mask put back


def _start(args, cwd, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def _wait_for(path: Path, proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and proc.poll() is None, f"{path} never appeared"
        time.sleep(0.02)


def _interrupted_run(tmp_path: Path, sig: int, args: list[str]) -> int:
    """A training run stopped by `sig` after its first checkpoint: exit code, message and files; its epochs."""
    proc = _start(["-m", "optcli", "train", *args, "--set", "train.epochs=100000", "--set", "name=r"], tmp_path)
    run_dir = tmp_path / "runs" / "r"
    _wait_for(run_dir / "last.pt", proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out
    assert f"interrupted by {signal.Signals(sig).name}" in out and "Traceback" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == signal.Signals(sig).name
    done = summary["epochs_completed"]
    assert len(load_checkpoint(run_dir)["history"]["epochs"]) == done > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, done + 1))  # the metrics and the checkpoint agree
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + done
    return done


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_train_ends_on_every_stop_signal_like_ctrl_c(tmp_path, sig):
    # SIGTERM too: the next test stops its run with it, through the same checks
    done = _interrupted_run(tmp_path, sig, [])
    if sig == signal.SIGINT:  # and the interrupted run resumes to more epochs
        result = cli("train", "--resume", tmp_path / "runs" / "r", "--set", f"train.epochs={done + 3}")
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["epochs_completed"] == done + 3


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_resumes_exactly(tmp_path):
    args = ["--set", "model.dropout=0.2", "--set", "scheduler={name: exponentiallr, gamma: 0.99}"]
    done = _interrupted_run(tmp_path, signal.SIGTERM, args)
    run_dir = tmp_path / "runs" / "r"
    # --resume is exact: the same weights, bit for bit, as one uninterrupted run of done + 2 epochs (both in
    # processes of their own with one thread: torch splits parallel sums by thread)
    resumed = _start(["-m", "optcli", "train", "--resume", str(run_dir), "--set", f"train.epochs={done + 2}"], tmp_path)
    whole = _start(["-m", "optcli", "train", *args, "--set", f"train.epochs={done + 2}", "--set", "name=w"], tmp_path)
    for proc in (resumed, whole):  # side by side: most of each one's time is importing torch
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    a, b = load_checkpoint(run_dir), load_checkpoint(tmp_path / "runs" / "w")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _cmdline(pid: int) -> str:
    """A process's command line, empty once it has exited (a short-lived child may end between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_parallel_compare_ends_its_workers_and_marks_their_trials(tmp_path, sig):
    # long trials, so that both workers are mid-trial when the signal reaches the terminal's whole process group
    args = [
        "-m",
        "optcli",
        "compare",
        "sgd",
        "adam",
        "--jobs",
        "2",
        "--seeds",
        "1",
        "--epochs",
        "100000",
        "--set",
        "name=c",
    ]
    proc = _start(args, tmp_path, start_new_session=True)
    deadline = time.monotonic() + 90
    while len(workers := [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    for worker in workers:  # past its start, when it ignores the terminal's signals; its trial follows at once
        _wait_for_mask(worker, "SigIgn", signal.SIGINT, proc)
    started = {w: _cpu_seconds(w) for w in workers}
    while any(_cpu_seconds(w) - started[w] < 1.0 for w in workers):  # training: the task's data loads in ms
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, out
    assert "Traceback" not in out and "0 of 2 trials finished" in out
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived the comparison"
        time.sleep(0.05)
    summary = strict_loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == signal.Signals(sig).name
    assert [t["status"] for t in summary["trials"]] == ["interrupted", "interrupted"]


def _cpu_seconds(pid: int) -> float:
    """The user and system CPU time of a process (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for_mask(pid: int, field: str, sig: int, proc, timeout: float = 90) -> None:
    """Until `sig`'s bit is set in the `field` mask (SigCgt: caught, SigIgn: ignored) of /proc/<pid>/status."""
    deadline = time.monotonic() + timeout
    while True:
        status = Path(f"/proc/{pid}/status").read_text()
        mask = int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1], 16)
        if mask & (1 << (sig - 1)):
            return
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def _wait_for_handler(proc, sig, timeout: float = 90) -> None:
    """Until the process catches `sig`: optcli is past its imports."""
    _wait_for_mask(proc.pid, "SigCgt", sig, proc, timeout)


@pytest.mark.slow
def test_serial_compare_saves_what_finished_on_sigterm(tmp_path):
    # the first trial ends at once (lr 1e6 diverges in its first epoch: a finished trial), the second runs on
    args = ["-m", "optcli", "compare", "sgd:lr=1e6", "adam", "--seeds", "1", "--epochs", "100000", "--set", "name=c"]
    proc = _start(args, tmp_path)
    _wait_for_handler(proc, signal.SIGTERM)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "1 of 2 trials finished" in out
    summary = strict_loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    trials = {t["label"]: t for t in summary["trials"]}
    assert trials["sgd:lr=1e6"]["status"] == "diverged" and trials["adam"]["status"] == "interrupted"
    rows = {r["optimizer"]: r for r in csv.DictReader((tmp_path / "runs" / "c" / "metrics.csv").open())}
    assert set(rows) == {"sgd:lr=1e6"}  # the finished trial's epochs kept; the interrupted one is only marked


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_torchrun_workers_save_on_a_stop_signal_and_resume(tmp_path, sig):
    args = ["-m", "optcli.torchrun", "--standalone", "--nproc_per_node=2", "-m", "optcli", "train"]
    proc = _start([*args, "--set", "train.epochs=100000", "--set", "name=d"], tmp_path)
    run_dir = tmp_path / "runs" / "d"
    _wait_for(run_dir / "last.pt", proc, timeout=120)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 128 + sig, out
    assert "Traceback" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == signal.Signals(sig).name
    done = summary["epochs_completed"]
    assert cli("train", "--resume", run_dir, "--set", f"train.epochs={done + 1}").exit_code == 0


# --- 4. bounded input -----------------------------------------------------------------------------------------

ALIAS_BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
optimizer: {name: sgd, lr: 0.1, momentum: *f}
"""


def test_an_alias_bomb_is_refused_by_its_expanded_size(tmp_path):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)  # 9**6 = 531441 scalars once expanded, 60 nodes on disk
    started = time.monotonic()
    result = cli("train", "--config", tmp_path / "bomb.yaml")
    assert_one_line_error(result, 2, "bomb.yaml:1:1", "more than 100000 nodes once aliases are expanded")
    assert time.monotonic() - started < 5
    levels = ["&l0 [" + ",".join("x" * 10) + "]"]
    levels += [f"&l{k} [" + ",".join([f"*l{k - 1}"] * 10) + "]" for k in range(1, 6)]
    bomb = "[" + ", ".join(levels) + "]"  # 10**6 scalars once expanded, in one --set value
    result = cli("train", "--set", f"optimizer.momentum={bomb}")
    assert_one_line_error(result, 2, "more than 100000 nodes")


def test_deep_nesting_is_refused_before_python_recursion_gives_out(tmp_path):
    (tmp_path / "deep.yaml").write_text("seed: " + "[" * 1000 + "]" * 1000 + "\n")
    assert_one_line_error(cli("train", "--config", tmp_path / "deep.yaml"), 2, "nested deeper than 64 levels")


def test_special_files_are_refused_without_reading_them(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")  # opening it for reading would block until a writer came
    assert_one_line_error(cli("train", "-c", tmp_path / "fifo.yaml"), 2, "is a FIFO (named pipe), not a config file")
    assert_one_line_error(cli("train", "-c", "/dev/zero"), 2, "/dev/zero: is a character device, not a config")
    run_dir = train("r")
    (run_dir / "last.pt").unlink()
    os.mkfifo(run_dir / "last.pt")
    result = cli("train", "--resume", run_dir, "--set", "train.epochs=3")
    assert_one_line_error(result, 2, "last.pt: is a FIFO (named pipe), not a checkpoint file")
    comparison = Path("runs") / "c"
    comparison.mkdir()
    os.mkfifo(comparison / "summary.json")
    assert_one_line_error(cli("merge", comparison, comparison), 2, "summary.json: is a FIFO")


# --- 5. the operating system says no --------------------------------------------------------------------------


def test_out_dir_that_is_a_file_or_too_long_is_one_line_and_exit_1(tmp_path):
    Path("afile").write_text("")
    assert_one_line_error(cli("train", *SHORT, "--set", "out_dir=afile"), 1, "afile: exists and is not a directory")
    long = "/".join(["d" * 250] * 20)
    assert_one_line_error(cli("train", *SHORT, "--set", f"out_dir={long}"), 1, "File name too long")
    result = cli("train", *SHORT, "--set", "name=" + "n" * 300)  # refused by the run-name rule, shown cut short
    assert_one_line_error(result, 2, "at most 100 characters (got 'nnnn")
    assert "(300 characters)" in result.output and len(result.output.strip()) < 300
    assert cli("train", *SHORT, "--set", "out_dir=missing/nested/runs").exit_code == 0  # a missing one is made


@pytest.fixture
def immutable_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (root ignores permission bits)")
    yield path
    subprocess.run(["chattr", "-i", path], check=True)


def test_a_read_only_out_dir_is_one_line_exit_1_and_no_run_directory(immutable_dir):
    result = cli("train", *SHORT, "--set", f"out_dir={immutable_dir.name}")
    assert_one_line_error(result, 1, f"{immutable_dir.name}/train-", "cannot create the run directory")
    assert list(immutable_dir.iterdir()) == []


def test_a_disk_that_fills_mid_run_marks_the_run_failed(tmp_path, monkeypatch):
    import optcli.rundir.files

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("last.pt") and Path(dst).exists():  # the first checkpoint fits, the next does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(optcli.rundir.files.os, "replace", full)
    monkeypatch.setattr("optcli.rundir.run.CHECKPOINT_INTERVAL_S", 0.0)
    result = cli("train", "--set", "train.epochs=5", "--set", "name=r")
    assert_one_line_error(result, 1, "runs/r/last.pt: cannot write (No space left on device)")
    summary = strict_loads((Path("runs") / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert not list((Path("runs") / "r").glob(".*.tmp"))
    # the summary and metrics speak of the epochs the checkpoint on disk holds (the first), not of later ones
    held = len(load_checkpoint(Path("runs") / "r")["history"]["epochs"])
    rows = (Path("runs") / "r" / "metrics.jsonl").read_text().splitlines()
    assert summary["epochs_completed"] == len(rows) == held == 1


def test_stdout_on_a_full_device_is_one_line_and_exit_1(tmp_path):
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "optcli", "train", *SHORT, "--set", "name=r", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: stdout: No space left on device", proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["status"] == "completed"


# --- 6. models that cannot train are refused before training -------------------------------------------------


def test_batch_norm_with_a_last_batch_of_one_is_refused_before_training(tmp_path):
    result = cli("train", "--set", "model.batch_norm=true", "--set", "data.samples=65", "--set", "train.epochs=2",
                 "--set", "data.val_fraction=0")  # fmt: skip
    assert_one_line_error(result, 2, "model.batch_norm: the last batch of each epoch holds 1 sample")
    assert not Path("runs").exists()


def test_a_model_too_large_for_memory_is_refused_with_the_estimate(tmp_path):
    result = cli("train", "--set", "model.hidden=[100000000]")
    line = assert_one_line_error(result, 2, "model: needs about", "2,200,000,001 parameters", "available on cpu")
    assert "TB" in line
    assert not Path("runs").exists()


# --- 7. files that every reader accepts -----------------------------------------------------------------------


def test_a_diverged_run_writes_strict_json_everywhere(tmp_path):
    result = cli("train", *SHORT, "--set", "optimizer={name: sgd, lr: 1.0e+30}", "--set", "name=r", "--json")
    assert result.exit_code == 1  # diverged
    printed = strict_loads(result.stdout)
    run_dir = Path("runs") / "r"
    summary = strict_loads((run_dir / "summary.json").read_text())
    rows = [strict_loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert printed["status"] == summary["status"] == "diverged"
    assert rows[-1]["train_loss"] is None  # not finite: written as null, and the status says why
    compared = cli("compare", "sgd:lr=1e30", "adam", *SHORT, "--seeds", "1", "--set", "name=c", "--json")
    assert compared.exit_code == 0, compared.output
    assert strict_loads(compared.stdout)["rows"][0]["status"] == "diverged 1/1"
    strict_loads((Path("runs") / "c" / "summary.json").read_text())


@pytest.mark.parametrize(
    "override",
    ["optimizer.lr=.nan", "optimizer.lr=.inf", "optimizer.groups=[{params: ['*.bias'], lr: .nan}]"],
)
def test_a_non_finite_lr_is_refused(tmp_path, override):
    assert_one_line_error(cli("train", "--set", override), 2, "must be > 0 and finite")


# --- 8. run files read back as untrusted ----------------------------------------------------------------------


def _tamper(run_dir: Path, change) -> None:
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, run_dir / "last.pt")


def test_checkpoints_are_validated_with_one_line_naming_the_file(tmp_path):
    run_dir = train("r")
    resume = ["train", "--resume", run_dir, "--set", "train.epochs=3"]
    _tamper(run_dir, lambda c: c["optimizer"]["param_groups"][0].update(lr="0.1"))
    assert_one_line_error(cli(*resume), 2, "last.pt: not a valid checkpoint: optimizer.param_groups.0.lr")
    _tamper(run_dir, lambda c: c.pop("format"))
    assert_one_line_error(cli(*resume), 2, "last.pt: written by an optcli older than run-file format 2")
    (run_dir / "last.pt").write_text("not a checkpoint\n" * 10)
    assert_one_line_error(cli(*resume), 2, "last.pt: not a readable checkpoint")
    assert_one_line_error(cli("inspect-params", "--checkpoint", run_dir), 2, "last.pt: not a readable checkpoint")


@pytest.fixture(scope="module")
def comparison_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("comparisons")
    with pytest.MonkeyPatch.context() as mp:  # made before the test's own folder (in_tmp): run in one of its own
        mp.chdir(root)
        for name, seed in (("a", 0), ("b", 1)):
            result = cli(
                "compare", "sgd", "adam", *SHORT, "--seeds", "1", "--set", f"seed={seed}", "--set", f"name={name}"
            )
            assert result.exit_code == 0, result.output
    return root / "runs"


@pytest.mark.parametrize(
    ("tamper", "fragment"),
    [
        (lambda s: s.pop("trials"), "not a comparison summary (missing trials)"),
        (lambda s: s.update(epochs="2"), "not a valid comparison summary: epochs"),
        (lambda s: s["trials"][0].update(seed="x"), "trials.0.seed"),
        (lambda s: s["trials"][0].update(label="rmsprop"), "trials.0: optimizer 'rmsprop' is not one of"),
        (lambda s: s["trials"][0]["epochs"][0].update(train_loss="low"), "trials.0.epochs.0.train_loss"),
        (lambda s: s.pop("format"), "written by an optcli older than run-file format 2"),
    ],
)
def test_merge_validates_summaries_with_one_line(tmp_path, comparison_dirs, tamper, fragment):
    shutil.copytree(comparison_dirs, "runs")
    path = Path("runs") / "b" / "summary.json"
    summary = json.loads(path.read_text())
    tamper(summary)
    path.write_text(json.dumps(summary))
    assert_one_line_error(cli("merge", "runs/a", "runs/b"), 2, "runs/b/summary.json")
    assert fragment in cli("merge", "runs/a", "runs/b").output


def test_merge_names_a_missing_directory_and_follows_the_run_name_rule(tmp_path, comparison_dirs):
    shutil.copytree(comparison_dirs, "runs")
    assert_one_line_error(cli("merge", "runs/missing", "runs/a"), 2, "runs/missing: no such directory")
    for bad in ("two\nlines", "..", "a/b", ".hidden"):
        assert_one_line_error(cli("merge", "runs/a", "runs/b", "--name", bad), 2, "--name: must be a plain")
    assert sorted(p.name for p in Path("runs").iterdir()) == ["a", "b"]
    assert cli("merge", "runs/a", "runs/b", "--name", "ab").exit_code == 0


def test_run_files_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        run_dir = train("r")
    finally:
        os.umask(old)
    for name in ("config.yaml", "summary.json", "metrics.csv", "metrics.jsonl", "last.pt"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o640, name
