"""A tuning trial left RUNNING by a process that ended without telling it (SIGKILL, a machine lost) is found by its
heartbeat, failed, run again and named in a warning line: the same command then ends with exit 0, never a silent
wait. OPTCLI_STALE_TRIAL_SECONDS=2 makes the grace (and the beats, a quarter of it) short enough for a test."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optcli.compare.comparison import parse_specs, run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.studies import HEARTBEAT, ask, heartbeats, open_storage, open_study
from optcli.compare.tuning import search_space, study_name
from optcli.config import load_config, to_yaml
from tests.conftest import cli
from tests.test_reliability import _start, strict_loads

optuna = pytest.importorskip("optuna")

SMALL = ["data.samples=64", "data.val_fraction=0.25", "model.hidden=[8]"]
LEFT = "was left running by a process that ended (no heartbeat for 2 s): marked failed and run again"


def _running(journal: Path, *, beating: bool = False) -> int:
    """The trials RUNNING in a journal file now (that have had a heartbeat: their process runs them)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    if not journal.exists():
        return 0
    storage = JournalStorage(JournalFileBackend(str(journal)))
    return sum(
        not beating or HEARTBEAT in t.system_attrs
        for s in storage.get_all_studies()
        for t in storage.get_all_trials(s._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    )


@pytest.mark.slow  # two optcli processes: about 10 s on an idle 2-core machine
def test_a_trial_left_running_by_a_killed_process_is_run_again_by_the_same_command(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCLI_STALE_TRIAL_SECONDS", "2")
    journal = tmp_path / "s.journal"
    args = ["compare", "adam", "--tune-lr", "--tune-budget", "2", "--seeds", "1", "--tune-storage", str(journal)]
    args += ["--epochs", "100", *(a for item in SMALL for a in ("--set", item))]
    proc = _start(["-m", "optcli", *args], tmp_path)
    deadline = time.monotonic() + 90
    while _running(journal, beating=True) < 2:  # both trials asked and under way
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to tell the study anything
    proc.communicate(timeout=30)
    assert _running(journal) == 2  # both asked trials are left RUNNING

    again = subprocess.run(
        [sys.executable, "-m", "optcli", *args, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stdout + again.stderr
    summary = strict_loads(again.stdout)
    assert summary["status"] == "completed" and _running(journal) == 0
    assert sorted(summary["warnings"]) == [f"tuning trial {n} of adam {LEFT}" for n in (0, 1)]
    trials = summary["tuning"]["optimizers"]["adam"]["trials"]
    assert [t["status"] for t in trials] == ["completed", "completed"]  # the points run again, in the budget
    assert (tmp_path / "runs").is_dir()
    (saved,) = [p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").exists()]
    assert strict_loads((saved / "summary.json").read_text())["warnings"] == summary["warnings"]


def test_a_database_study_uses_optunas_heartbeat_and_waits_only_for_the_grace(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCLI_STALE_TRIAL_SECONDS", "2")
    url = f"sqlite:///{tmp_path}/studies.db"
    cfg = load_config(None, [*SMALL, "train.epochs=2"])
    options = CompareOptions(seeds=1, tune_lr=True, tune_budget=2, tune_storage=url)
    (spec,) = parse_specs(["sgd"])
    space = search_space(spec, lr_only=True)
    name = study_name(spec, space, budget=2, seed=cfg.seed, task=to_yaml(cfg.model_copy(update={"name": None})))
    # a process that asked the command's two trials, beat once for them and died
    store = open_storage(url, None)
    study = open_study(name, space, store, seed=cfg.seed)
    with heartbeats(store, [(study, trial) for trial in ask(study, space, budget=2)]):
        pass
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "RUNNING"]

    started = time.monotonic()
    again = run_comparison(cfg, ["sgd"], options)  # the heartbeats are fresh: it waits for them to go stale
    assert time.monotonic() - started < 30
    assert again.status == "completed"
    assert sorted(again.warnings) == [f"tuning trial {n} of sgd {LEFT}" for n in (0, 1)]
    assert [r["status"] for r in again.tuning["optimizers"]["sgd"]["trials"]] == ["completed", "completed"]
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=url).trials]
    assert states == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]  # failed for want of a heartbeat, then run again


def test_the_grace_setting_is_checked_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCLI_STALE_TRIAL_SECONDS", "1")
    result = cli("compare", "adam", "--tune-lr", "--set", "data.val_fraction=0.25")
    assert result.exit_code == 2, result.output
    assert "error: OPTCLI_STALE_TRIAL_SECONDS=1: expected a whole number of seconds, at least 2" in result.output
    assert not (tmp_path / "runs").exists()
