"""Every ending of compare's newer paths leaves a status: a tuning or multi-task comparison stopped by a signal writes
summary.json with status interrupted (the work done kept), an interrupted tuning trial is marked failed in its study
so that the same command resumes it, and a figure that cannot be drawn is a warning line, never a failed run."""

import json
import signal
import time
from pathlib import Path

import pytest

import optcli.compare.comparison as comparison_module
from optcli.compare.comparison import run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.runners import TrialRunner, TrialsInterrupted
from optcli.config import load_config
from optcli.engine.loop import History
from optcli.errors import RunInterrupted
from tests.conftest import cli
from tests.test_reliability import _start, _wait_for_handler, strict_loads

SMALL = ["data.samples=64", "data.val_fraction=0.25", "train.epochs=1", "model.hidden=[8]"]


class StopAfter(TrialRunner):
    """The comparison's own runner, stopped as SIGTERM would stop it after the first `n` trials of its first plan."""

    def __init__(self, inner: TrialRunner, n: int):
        super().__init__()
        self.inner, self.n, self.plans = inner, n, []

    def run(self, plan):
        self.plans.append(plan)
        done = self.inner.run(plan[: self.n])
        rest = [History(status="interrupted") for _ in plan[self.n :]]
        raise TrialsInterrupted(done + rest, signal.SIGTERM)

    def close(self):
        self.inner.close()


def _study_trials(storage: Path) -> dict[str, list[tuple[str, str | None]]]:
    import optuna

    backend = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
    out = {}
    for summary in optuna.get_all_study_summaries(backend):
        study = optuna.load_study(study_name=summary.study_name, storage=backend)
        out[summary.study_name.rsplit("-", 1)[0]] = [(t.state.name, t.user_attrs.get("status")) for t in study.trials]
    return out


def test_an_interrupted_tuning_saves_its_status_and_the_same_command_resumes_the_study(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    storage = tmp_path / "s.journal"
    cfg = load_config(None, [*SMALL, "name=first"])
    options = CompareOptions(seeds=1, tune_lr=True, tune_budget=3, tune_storage=str(storage))
    make_runner = comparison_module.make_runner
    stopper: list[StopAfter] = []

    def stopped_runner(*args, **kwargs):
        stopper.append(StopAfter(make_runner(*args, **kwargs), n=2))
        return stopper[0]

    monkeypatch.setattr(comparison_module, "make_runner", stopped_runner)
    with pytest.raises(RunInterrupted) as stop:
        run_comparison(cfg, ["sgd:lr=0.01", "adam"], options)
    assert stop.value.exit_code == 143 and "tuning stopped after 2 finished tuning trials" in str(stop.value)
    summary = strict_loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    assert summary["tuning"]["status"] == "interrupted"
    kept = {label: [r["status"] for r in t["trials"]] for label, t in summary["tuning"]["optimizers"].items()}
    assert kept == {"sgd:lr=0.01": ["completed", "completed"], "adam": []}  # the trials that finished are kept
    assert {t["status"] for t in summary["trials"]} == {"interrupted"}  # the seeds never ran
    studies = _study_trials(storage)
    # the 4 interrupted trials are failed (none left RUNNING) and their points queued again
    assert studies["sgd:lr=0.01"] == [("COMPLETE", "completed")] * 2 + [("FAIL", "interrupted"), ("WAITING", None)]
    assert studies["adam"] == [("FAIL", "interrupted")] * 3 + [("WAITING", None)] * 3

    monkeypatch.setattr(comparison_module, "make_runner", make_runner)
    done: list[str] = []
    callbacks = comparison_module.TrialCallbacks(on_trial_done=lambda label, seed, h: done.append(label))
    started = time.monotonic()
    again = run_comparison(
        cfg.model_copy(update={"name": "again"}), ["sgd:lr=0.01", "adam"], options, callbacks=callbacks
    )
    assert time.monotonic() - started < 60  # no wait on a trial left RUNNING
    assert again.status == "completed"
    assert sorted(done) == ["adam"] * 4 + ["sgd:lr=0.01"] * 2  # the 4 interrupted trials, then the 2 seeds
    for label, t in again.tuning["optimizers"].items():
        assert len(t["trials"]) == 3 and all(r["status"] == "completed" for r in t["trials"]), label
    sgd = again.tuning["optimizers"]["sgd:lr=0.01"]["trials"]
    first = summary["tuning"]["optimizers"]["sgd:lr=0.01"]["trials"]
    assert sgd[:2] == first  # the finished trials were not run again
    assert sgd[2]["params"] == studies_params(storage, "sgd:lr=0.01")[2]  # the interrupted point, run now


def studies_params(storage: Path, label: str) -> list[dict]:
    import optuna

    backend = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
    for summary in optuna.get_all_study_summaries(backend):
        if summary.study_name.rsplit("-", 1)[0] == label:
            return [t.params for t in optuna.load_study(study_name=summary.study_name, storage=backend).trials]
    return []


def _run_until(args: list[str], tmp_path: Path, ready: Path, sig: int = signal.SIGTERM):
    proc = _start(["-m", "optcli", *args], tmp_path)
    _wait_for_handler(proc, sig)
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None, f"{ready} never appeared"
        time.sleep(0.05)
    time.sleep(1)  # the trials are under way
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_sigterm_during_parallel_tuning_leaves_an_interrupted_summary(tmp_path):
    pytest.importorskip("optuna")
    args = ["compare", "sgd", "adam", "--tune-lr", "--tune-budget", "2", "--jobs", "2", "--seeds", "1"]
    args += ["--epochs", "100000", "--set", "data.samples=32", "--set", "name=t"]
    code, out = _run_until(args, tmp_path, tmp_path / "runs" / "t" / "tuning.journal")
    assert code == 143 and "Traceback" not in out, out
    assert "interrupted by SIGTERM; tuning stopped after 0 finished tuning trials" in " ".join(out.split())
    summary = strict_loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["tuning"]["status"] == "interrupted"


def test_sigterm_during_the_second_task_leaves_a_top_level_summary(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 1}\ndata: {samples: 32}\n")
    (tmp_path / "long.yaml").write_text("train: {epochs: 100000}\ndata: {samples: 32}\n")
    args = ["compare", "sgd", "adam", "-c", "a.yaml", "-c", "long.yaml", "--seeds", "1", "--set", "name=m"]
    code, out = _run_until(args, tmp_path, tmp_path / "runs" / "m" / "a" / "report.html")  # task a is done
    assert code == 143 and "Traceback" not in out, out
    assert "interrupted by SIGTERM; 1 of 2 tasks finished, saved in runs/m" in " ".join(out.split())
    summary = strict_loads((tmp_path / "runs" / "m" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    assert [(t["name"], t["status"]) for t in summary["tasks"]] == [("a", "completed"), ("long", "interrupted")]
    assert list(summary["measures"]) == ["a"]  # the profile is over the finished tasks
    assert json.loads((tmp_path / "runs" / "m" / "long" / "summary.json").read_text())["status"] == "interrupted"


def test_a_tuning_plot_that_cannot_be_drawn_is_a_warning_and_the_run_stands(tmp_path):
    pytest.importorskip("optuna")
    space = "tuning.spaces={adam: {eps: [1.0e-300, 1.0e+300]}}"  # valid, but matplotlib overflows on its log axis
    small = [a for item in SMALL for a in ("--set", item)]
    result = cli(
        "compare", "adam", "--tune", "--tune-budget", "2", "--seeds", "1", *small, "--set", space, "--set", "name=c"
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: tuning.png not drawn (OverflowError:" in text and "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "c"
    assert not (run_dir / "tuning.png").exists()
    assert {"summary.json", "metrics.csv", "tuning.csv", "loss.png", "report.html"} <= {
        p.name for p in run_dir.iterdir()
    }
    summary = strict_loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    (warning,) = summary["warnings"]
    assert warning.startswith("tuning.png not drawn (OverflowError:") and warning in text


@pytest.mark.parametrize(
    "ending, code",
    [("completed", 0), ("interrupted", 143), ("failed", 1)],
)
def test_every_ending_prints_and_records_the_figures_not_drawn(ending, code, tmp_path, monkeypatch):
    import optcli.report.plots as plots

    def broken(comparison, path):
        raise ValueError("Data cannot be log-scaled\nsecond line")

    monkeypatch.setattr(plots, "save_loss_plot", broken)
    make_runner = comparison_module.make_runner
    runners = {"interrupted": lambda inner: StopAfter(inner, 1), "failed": lambda inner: Failing(inner, 0)}
    if ending in runners:
        monkeypatch.setattr(comparison_module, "make_runner", lambda *a, **k: runners[ending](make_runner(*a, **k)))
    small = [a for item in SMALL for a in ("--set", item)]
    result = cli("compare", "sgd", "adam", "--seeds", "1", *small, "--set", "name=c")
    assert result.exit_code == code, result.output
    warning = "loss.png not drawn (ValueError: Data cannot be log-scaled)"
    lines = result.output.splitlines()
    assert f"warning: {warning}" in lines and "Traceback" not in result.output
    if ending == "interrupted":  # the warning, then the line that says how it ended
        assert lines[-1].startswith("interrupted by SIGTERM; 1 of 2 trials finished")
    summary = strict_loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert summary["status"] == ending and summary["warnings"] == [warning]
    assert (tmp_path / "runs" / "c" / "metrics.csv").is_file() and not (tmp_path / "runs" / "c" / "loss.png").exists()


def test_a_train_plot_that_cannot_be_drawn_is_a_warning(tmp_path, monkeypatch):
    import optcli.report.plots as plots

    def broken(history, path):
        raise ValueError("Data cannot be log-scaled\nsecond line")

    monkeypatch.setattr(plots, "save_run_plot", broken)
    result = cli("train", "--set", "train.epochs=1", "--set", "data.samples=32", "--set", "name=r")
    assert result.exit_code == 0, result.output
    assert "warning: loss.png not drawn (ValueError: Data cannot be log-scaled)" in " ".join(result.output.split())
    assert (tmp_path / "runs" / "r" / "summary.json").is_file()


class Failing(TrialRunner):
    """Every trial raised an error in its worker (a Ray worker lost twice): marked failed, as RayRunner marks it;
    `ok` trials of the plan run for real."""

    def __init__(self, inner: TrialRunner, ok: int):
        super().__init__()
        self.inner, self.ok = inner, ok

    def run(self, plan):
        done = self.inner.run(plan[: self.ok])
        return done + [History(status="failed", error="WorkerCrashedError: lost") for _ in plan[self.ok :]]

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("ok, status, code", [(0, "failed", 1), (1, "partly_failed", 3)])
def test_trials_that_failed_give_a_status_and_an_exit_code(ok, status, code, tmp_path, monkeypatch):
    make_runner = comparison_module.make_runner
    monkeypatch.setattr(comparison_module, "make_runner", lambda *a, **k: Failing(make_runner(*a, **k), ok))
    small = [a for item in SMALL for a in ("--set", item)]
    result = cli("compare", "sgd", "adam", "--seeds", "1", *small, "--set", "name=c")
    assert result.exit_code == code, result.output
    assert f"error: {status.replace('_', ' ')}: see the failed trials in runs/c" in result.output
    summary = strict_loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert summary["status"] == status
    assert [t["status"] for t in summary["trials"]] == ["completed"] * ok + ["failed"] * (2 - ok)


def test_a_stop_costs_the_work_done_not_the_epochs_asked(tmp_path):
    args = ["compare", "sgd", "adam", "--seeds", "1", "--epochs", "1000000000000000", "--set", "data.samples=32"]
    proc = _start(["-m", "optcli", *args, "--set", "name=c"], tmp_path)
    _wait_for_handler(proc, signal.SIGTERM)
    time.sleep(2)  # the first trial is under way
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in out, out
    assert time.monotonic() - stopped < 15  # was: still running 30 s later (curves over range(epochs))
    summary = (tmp_path / "runs" / "c" / "summary.json").read_bytes()
    assert len(summary) < 1_000_000 and strict_loads(summary)["epochs"] == 10**15
