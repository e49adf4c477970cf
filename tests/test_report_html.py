"""report.html and results.csv: written by compare and train, rebuilt by `optcli report`, several runs side by
side, interrupted runs, tampered run directories; and the page as a browser renders it (headless Chromium)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from optcli.compare.comparison import load_compare_config, run_comparison
from optcli.compare.options import CompareOptions
from optcli.compare.runners import TrialCallbacks
from optcli.config import load_config
from optcli.errors import RunInterrupted
from optcli.report.format import mean_pm
from optcli.report.html import build_report, report_after_run
from optcli.rundir.run import train_run
from tests.conftest import cli

REPO = Path(__file__).resolve().parents[1]


def _compare(root: Path, name: str, *extra: str) -> Path:
    old = os.getcwd()
    os.chdir(root)
    try:
        result = cli("compare", "sgd", "adam", "--seeds", "2", "--epochs", "3", "--set", f"name={name}", *extra)
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    return root / "runs" / name


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """One small comparison (the default regression task, 2 optimizers x 2 seeds x 3 epochs), shared by the tests
    that only read it; each copies it before writing."""
    root = tmp_path_factory.mktemp("report")
    _compare(root, "c")
    return root


@pytest.fixture
def comparison(run_root, tmp_path) -> Path:
    shutil.copytree(run_root / "runs" / "c", tmp_path / "runs" / "c")
    return tmp_path / "runs" / "c"


class Cells(HTMLParser):
    """The <td data-value> cells of the summary table, in order, as (text, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, float]] = []
        self._in: float | None = None
        self._summary = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._summary = "summary" in (a.get("class") or "")
        if tag == "td" and self._summary and a.get("data-value") is not None:
            self._in = json.loads(a["data-value"])

    def handle_data(self, data):
        if self._in is not None:
            self.cells.append((data, self._in))
            self._in = None


def _summary_values(summary: dict) -> list[float]:
    keys = [
        "final_train_loss",
        "best_val_loss",
        "val_r2",
        "excess_val_loss",
        "seconds_per_epoch_median_warm",
        "state_bytes",
    ]
    return [r[k] for r in summary["rows"] for k in keys]


def test_compare_writes_report_and_results_and_says_where_on_stderr(tmp_path):
    result = cli("compare", "sgd", "adam", "--seeds", "2", "--epochs", "2", "--set", "name=j", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run_dir"] == "runs/j"  # stdout stays one JSON document
    run_dir = tmp_path / "runs" / "j"
    uri = (run_dir / "report.html").resolve().as_uri()
    assert f"report: runs/j/report.html ({uri})" in result.stderr
    assert (run_dir / "report.html").stat().st_size > 0 and (run_dir / "results.csv").is_file()


def test_results_csv_has_one_row_per_optimizer_seed_and_epoch_with_the_summary_values(comparison):
    summary = json.loads((comparison / "summary.json").read_text())
    rows = list(csv.DictReader((comparison / "results.csv").open()))
    assert len(rows) == 2 * 2 * 3
    assert list(rows[0])[:3] == ["task", "optimizer", "optimizer_name"]
    for col in ("seed", "epoch", "steps", "train_seconds", "train_loss", "val_loss", "lr", "status"):
        assert col in rows[0]
    for t in summary["trials"]:
        mine = [r for r in rows if r["optimizer"] == t["label"] and int(r["seed"]) == t["seed"]]
        assert [int(r["epoch"]) for r in mine] == [1, 2, 3]
        assert [float(r["val_loss"]) for r in mine] == [e["val_loss"] for e in t["epochs"]]
        assert [int(r["steps"]) for r in mine] == [e["steps"] for e in t["epochs"]]
        assert {r["task"] for r in mine} == {"regression"} and {r["status"] for r in mine} == {"completed"}


def test_the_page_holds_the_verdict_and_the_summary_numbers(comparison):
    summary = json.loads((comparison / "summary.json").read_text())
    page = (comparison / "report.html").read_text()
    for v in summary["verdicts"]:
        assert v["text"] in page.replace("&#x27;", "'")
    parser = Cells()
    parser.feed(page)
    assert [value for _, value in parser.cells] == _summary_values(summary)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page  # offline
    assert (
        page.index("Summary")
        < page.index("Learning curves")
        < page.index("Dynamics per layer")
        < page.index("<h2>Command</h2>")
        < page.index("Provenance")
    )


def test_text_from_the_files_is_escaped_and_the_data_cannot_close_its_script(comparison):
    path = comparison / "summary.json"
    evil = "x</script><b>bold</b>"
    path.write_text(path.read_text().replace('"adam"', json.dumps(evil)))
    out = build_report([comparison])
    page = Path(out["report"]).read_text()
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    data = re.search(r'<script type="application/json" id="optcli-data">(.*?)</script>', page, re.S)
    assert data is not None and evil in json.dumps(json.loads(data.group(1)))


def test_optcli_report_rebuilds_the_page_from_the_files_alone(comparison):
    (comparison / "report.html").unlink()
    (comparison / "results.csv").unlink()
    result = cli("report", comparison)
    assert result.exit_code == 0, result.output
    assert (comparison / "report.html").is_file() and (comparison / "results.csv").is_file()
    assert "MB" in result.stdout


def test_side_by_side_shows_what_differs_first(run_root, tmp_path):
    other = _compare(tmp_path, "b", "--set", "data.batch_size=32")
    result = cli("report", run_root / "runs" / "c", other, "-o", "both.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "both.html").read_text()
    differs = page.index("What differs between the runs")
    assert differs < page.index("Optimizers side by side") < page.index("Summary")
    row = re.search(r"<tr><td>config\.data\.batch_size</td><td>(\d+)</td><td>(\d+)</td></tr>", page)
    assert row is not None and row.groups() == ("64", "32")
    assert "config.name" not in page[differs : page.index("Optimizers side by side")]


def test_several_runs_need_an_output_file(run_root):
    result = cli("report", run_root / "runs" / "c", run_root / "runs" / "c")
    assert result.exit_code == 2 and "-o FILE" in result.output


@pytest.mark.parametrize(
    ("tamper", "fragment"),
    [
        (lambda d: shutil.rmtree(d), "no such directory"),
        (lambda d: (d / "summary.json").unlink(), "no summary.json"),
        (lambda d: (d / "summary.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "summary.json").write_text(
                '{"format": 2, "specs": [], "seeds": [0], "epochs": 1, "task": "regression", "trials": []}'
            ),
            "specs",
        ),
        (lambda d: (d / "config.yaml").write_text("a: [unclosed"), "invalid YAML"),
    ],
)
def test_a_missing_or_tampered_run_directory_is_one_line_exit_2(comparison, tamper, fragment):
    tamper(comparison)
    result = cli("report", comparison)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_report_that_cannot_be_built_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    assert report_after_run(tmp_path / "nothing").startswith("report.html not written (")

    def broken(pages):
        raise RuntimeError("the page broke")

    monkeypatch.setattr("optcli.report.html.render", broken)
    result = cli("compare", "sgd", "adam", "--seeds", "1", "--epochs", "1", "--set", "name=w")
    assert result.exit_code == 0, result.output
    assert "report.html not written (the page broke)" in result.output
    assert "warning: no report.html in runs/w" in result.stderr
    assert (tmp_path / "runs" / "w" / "summary.json").is_file()


def test_an_interrupted_train_run_reports_interrupted_and_its_epochs(tmp_path):
    cfg = load_config(None, ["name=t", "train.epochs=5"])

    def stop_at_two(history):
        if len(history.epochs) == 2:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        train_run(cfg, on_epoch=stop_at_two)
    page = (tmp_path / "runs" / "t" / "report.html").read_text()
    assert "interrupted by SIGINT" in page and "2 of 5 epochs" in page
    rows = list(csv.DictReader((tmp_path / "runs" / "t" / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and {r["status"] for r in rows} == {"interrupted"}


def test_an_interrupted_comparison_reports_interrupted_and_the_finished_trials(tmp_path):
    cfg = load_compare_config(None, ["name=i", "train.epochs=2"])
    started = []

    def stop_third(label, seed):
        started.append(label)
        if len(started) == 3:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        run_comparison(
            cfg, ["sgd", "adam"], CompareOptions(seeds=2), callbacks=TrialCallbacks(on_trial_start=stop_third)
        )
    page = (tmp_path / "runs" / "i" / "report.html").read_text()
    assert "interrupted by SIGINT" in page and "2 of 4 trials finished" in page
    data = json.loads(re.search(r'id="optcli-data">(.*?)</script>', page, re.S).group(1))
    val = next(p for p in data["plots"] if p["id"].endswith("val_loss"))
    assert [s["epoch"] for s in val["series"]] == [[1, 2], [1, 2]]  # seed 0 of each optimizer finished


def test_a_comparison_over_tasks_has_one_page_with_a_section_per_task(tmp_path):
    configs = [REPO / "configs" / "regression.yaml", REPO / "configs" / "rosenbrock.yaml"]
    args = ["compare", "sgd", "adam", "--seeds", "1", "--epochs", "2", "--set", "name=m"]
    result = cli(*args, "-c", configs[0], "-c", configs[1])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "runs" / "m" / "report.html").read_text()
    assert page.index("<h2>Task regression</h2>") < page.index("<h2>Task rosenbrock</h2>")
    assert page.index("<h2>Task rosenbrock</h2>") < page.index("<h2>Performance profile</h2>")
    assert "Trajectories" in page  # rosenbrock's trajectories.png
    rows = list(csv.DictReader((tmp_path / "runs" / "m" / "results.csv").open()))
    assert {r["task"] for r in rows} == {"regression", "rosenbrock"} and len(rows) == 2 * 2 * 1 * 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run does)")
def test_the_page_renders_in_a_browser_with_every_plot_drawn_and_no_script_error(comparison, tmp_path):
    summary = json.loads((comparison / "summary.json").read_text())
    url = (comparison / "report.html").resolve().as_uri()
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}"]
    proc = subprocess.run(
        [_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "Uncaught" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r'<div id="js-errors"></div>', dom), "a script error was caught on the page"
    for v in summary["verdicts"]:
        assert v["text"] in dom.replace("&#x27;", "'")
    parser = Cells()
    parser.feed(dom)
    assert [value for _, value in parser.cells] == _summary_values(summary)
    texts = [text for text, _ in parser.cells]
    for i, r in enumerate(summary["rows"]):  # the terminal's wording of the same numbers
        assert texts[6 * i : 6 * i + 2] == [mean_pm(r[k], r[k + "_std"]) for k in ("final_train_loss", "best_val_loss")]
    assert dom.count('<div class="plot" id=') == 3  # train loss, validation loss and validation R²
    assert 'data-plots-drawn="3"' in dom and dom.count('<svg viewBox="0 0 720 340" class="plot-svg"') == 3
    assert dom.count('class="median"') == 3 * 2 and dom.count('class="band"') == 3 * 2  # 3 plots x 2 optimizers
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), *flags, "--hide-scrollbars", "--window-size=1200,1800", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.read_bytes().startswith(b"\x89PNG")
