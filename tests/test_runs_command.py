"""`optcli runs`: the run directories under out_dir, newest first, as a table and as JSON."""

from __future__ import annotations

import json
import os

from tests.conftest import cli


def _age(run_dir, seconds_ago: float) -> None:
    """Date a run by its summary.json, as the listing does."""
    stamp = (run_dir / "summary.json").stat().st_mtime - seconds_ago
    os.utime(run_dir / "summary.json", (stamp, stamp))


def test_runs_lists_newest_first_with_command_task_optimizers_status_and_best(tmp_path):
    assert cli("train", "--epochs", "2", "--set", "name=t").exit_code == 0
    assert cli("compare", "sgd", "adam", "--seeds", "1", "--epochs", "2", "--set", "name=c").exit_code == 0
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "summary.json").write_text("[1, 2")
    (tmp_path / "runs" / "not-a-run").mkdir()  # no summary.json: not listed
    _age(tmp_path / "runs" / "c", 100)
    _age(tmp_path / "runs" / "t", 200)

    result = cli("runs", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["broken", "c", "t"]
    broken, c, t = rows
    assert broken["status"].startswith("unreadable (") and broken["command"] is None
    assert (c["command"], c["task"], c["optimizers"], c["status"]) == (
        "compare",
        "regression",
        ["sgd", "adam"],
        "completed",
    )
    summary = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    best = min(summary["rows"], key=lambda r: r["best_val_loss"])
    assert c["best"] == {"metric": f"best_val_loss {best['label']}", "value": best["best_val_loss"]}
    assert c["report"] == "runs/c/report.html"
    train = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert (t["command"], t["task"], t["optimizers"], t["status"]) == ("train", "regression", ["adam"], "completed")
    assert t["best"] == {"metric": "best_val_loss", "value": train["best"]["val_loss"]}
    assert c["date"] > t["date"]

    table = cli("runs")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if f" {name} " in line) for name in ("broken", "c", "t")]
    assert order == sorted(order)


def test_runs_of_a_missing_out_dir_is_one_line_exit_2(tmp_path):
    result = cli("runs", "--out-dir", "nowhere")
    assert result.exit_code == 2 and "nowhere: no such directory" in result.output
