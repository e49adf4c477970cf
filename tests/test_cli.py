"""The command-line grammar shared by every command: options, run names, terminal widths, pipes."""

import errno
import json
import os
import re
import subprocess
import sys

import pytest

from optcli.config import parse_yaml, validate
from tests.conftest import cli

FAST = ["--set", "data.samples=32", "--set", "model.hidden=[8]"]


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"optcli {version('optcli')}"


@pytest.mark.parametrize("command", ["train", "compare"])
def test_epochs_json_and_print_config_mean_the_same_on_train_and_compare(command):
    specs = ["sgd"] if command == "compare" else []
    printed = cli(command, *specs, *FAST, "--epochs", "3", "--print-config")
    assert printed.exit_code == 0, printed.output
    assert validate(parse_yaml(printed.output)).train.epochs == 3
    result = cli(command, *specs, *FAST, "--epochs", "3", "--set", "name=run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["run_dir"].endswith(os.path.join("runs", "run"))  # one run-name rule: runs/<name> for every command
    epochs = out["epochs_completed"] if command == "train" else out["epochs"]
    assert epochs == 3


def test_epochs_wins_over_set(tmp_path):
    result = cli("train", *FAST, "--set", "train.epochs=9", "--epochs", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["epochs_completed"] == 2


def test_completion_is_offered():
    result = cli("--help")
    assert "--install-completion" in result.output and "--show-completion" in result.output


ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLOR = re.compile(r"\x1b\[[0-9;]*(3[0-9]|9[0-7]|38;[0-9;]+)m")  # foreground colors, not bold or italic


def _compare_as_on_a_terminal(**env) -> subprocess.Popen:
    """FORCE_COLOR makes Rich treat the pipe as a terminal, so colors would be written unless something says no."""
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    env = {**base, "FORCE_COLOR": "1", "COLUMNS": "100", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "optcli", "compare", "sgd:lr=1e6", "adam", "--epochs", "2", *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_no_color_and_dumb_terminals_are_honoured():
    # three processes side by side: most of each one's time is importing torch
    runs = [
        _compare_as_on_a_terminal(),
        _compare_as_on_a_terminal(NO_COLOR="1"),
        _compare_as_on_a_terminal(TERM="dumb"),
    ]
    (colored, _), (no_color, _), (dumb, _) = [p.communicate(timeout=180) for p in runs]
    assert COLOR.search(colored), "the reference run should be colored (a diverged row is red)"
    assert runs[1].returncode == 0 and not COLOR.search(no_color)
    assert runs[2].returncode == 0 and not ANSI.search(dumb)


def test_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before optcli writes: every write fails with EPIPE
    proc = subprocess.run(
        [sys.executable, "-m", "optcli", "optimizers"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120
    )
    os.close(write)
    assert proc.returncode == 1
    assert proc.stderr == "", proc.stderr


def _rendered_cells(output: str) -> list[str]:
    return [cell.strip() for line in output.splitlines() for cell in re.split(r"[│┃]", line) if cell.strip()]


@pytest.mark.parametrize("width", [60, 80])
def test_tables_keep_names_and_numbers_whole_at_narrow_widths(width, repo_root):
    tutorial = ["-c", repo_root / "configs" / "tutorial.yaml", "--set", "model.batch_norm=true"]  # fc1 is 100×1000
    result = cli("inspect-params", "--optimizer", "sgd:lr=0.1", "--step", *tutorial, width=width)
    assert result.exit_code == 0, result.output
    assert all(len(line) <= width for line in result.stdout.splitlines())
    cells = set(_rendered_cells(result.stdout))
    for name in ("fc1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "out.bias", "100×1000"):
        assert name in cells, name
    assert "…" not in result.stdout
    compare = cli("compare", "sgd:lr=0.01,momentum=0.9", "adam", *FAST, "--epochs", "2", width=width)
    assert compare.exit_code == 0, compare.output
    assert all(len(line) <= width for line in compare.stdout.splitlines())
    assert "…" not in compare.stdout and "sgd:lr=0.01,momentum=0.9" in _rendered_cells(compare.stdout)


# --- the error boundary: a user's mistake is one line, a bug keeps its traceback ---------------------------------


def _optimizers_raising(monkeypatch, exc: BaseException) -> None:
    def broken():
        raise exc

    monkeypatch.setattr("optcli.engine.optimizers.list_optimizers", broken)


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "runs/x"), "error: runs/x: Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"), "error: stdout: No space left on device"),
        (OSError(errno.EROFS, "Read-only file system", "runs"), "error: runs: Read-only file system"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "c.yaml"), "error: c.yaml: Is a directory"),
    ],
)
def test_an_os_error_the_user_causes_is_one_line_and_exit_1(monkeypatch, exc, line):
    _optimizers_raising(monkeypatch, exc)
    result = cli("optimizers")
    assert result.exit_code == 1 and result.output.splitlines() == [line]


@pytest.mark.parametrize("exc", [OSError(errno.EBADF, "Bad file descriptor"), OSError("no errno"), RuntimeError("bug")])
def test_an_unexpected_error_is_not_turned_into_a_line(monkeypatch, exc):
    _optimizers_raising(monkeypatch, exc)
    result = cli("optimizers")
    assert result.exit_code == 1 and result.exception is exc  # it leaves the command, for Python to print
    assert "error:" not in result.output


def test_an_unexpected_os_error_prints_its_traceback():
    code = (
        "import errno, optcli.engine.optimizers as o\n"
        "def broken(): raise OSError(errno.EBADF, 'Bad file descriptor')\n"
        "o.list_optimizers = broken\n"
        "from optcli.cli import app\n"
        "app(['optimizers'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "OSError: [Errno 9] Bad file descriptor"


@pytest.mark.parametrize("how", ["env", "option"])
def test_debug_shows_the_traceback_of_a_user_error_too(monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("OPTCLI_DEBUG", "1")
    result = cli(*(["--debug"] if how == "option" else []), "train", "--set", "no_such_key=1")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "load_config" in result.output
    assert lines[-1] == "error: --set no_such_key=1: unknown key 'no_such_key'" and len(lines) > 3


def test_without_debug_a_user_error_is_one_line(monkeypatch):
    monkeypatch.setenv("OPTCLI_DEBUG", "0")
    result = cli("train", "--set", "no_such_key=1")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: --set no_such_key=1: unknown key")
