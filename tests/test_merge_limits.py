"""merge is bound by one comparison's limit of trials (optcli/limits.py): parts that would make more are refused
with one line naming them, before anything is written."""

import json
import shutil
from pathlib import Path

from optcli.limits import MAX_TRIALS
from tests.conftest import cli
from tests.test_reliability import assert_one_line_error


def _part(source: Path, name: str, seeds: range) -> Path:
    """A copy of `source`, a one-seed comparison, as if it had run every seed of `seeds`."""
    part = source.parent / name
    shutil.copytree(source, part)
    summary = json.loads((part / "summary.json").read_text())
    (trial,) = summary["trials"]
    summary["seeds"] = list(seeds)
    summary["trials"] = [{**trial, "seed": seed} for seed in seeds]
    (part / "summary.json").write_text(json.dumps(summary))
    return part


def test_merge_refuses_parts_over_the_trial_limit_before_writing_anything(tmp_path):
    result = cli("compare", "sgd", "--seeds", "1", "--epochs", "1", "--set", "data.samples=32", "--set", "name=one")
    assert result.exit_code == 0, result.output
    one = tmp_path / "runs" / "one"
    half = MAX_TRIALS // 2
    a, b = _part(one, "a", range(half + 1)), _part(one, "b", range(half + 1, 2 * half + 2))
    line = assert_one_line_error(cli("merge", str(a), str(b), "--name", "ab"), 2)
    assert line == (
        f"error: merge: {a} ({half + 1} trials) + {b} ({half + 1} trials) = {MAX_TRIALS + 2} trials, over the limit "
        f"of {MAX_TRIALS} per comparison (each is a record in summary.json); merge fewer parts"
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b", "one"]  # nothing written


def test_parts_at_the_limit_merge(tmp_path, monkeypatch):
    import optcli.compare.merge as merge_module

    result = cli("compare", "sgd", "--seeds", "1", "--epochs", "1", "--set", "data.samples=32", "--set", "name=one")
    assert result.exit_code == 0, result.output
    one = tmp_path / "runs" / "one"
    two = _part(one, "two", range(1, 2))
    monkeypatch.setattr(merge_module, "MAX_TRIALS", 2)
    assert cli("merge", str(one), str(two), "--name", "both").exit_code == 0  # 2 trials: at the limit
    monkeypatch.setattr(merge_module, "MAX_TRIALS", 1)
    assert_one_line_error(cli("merge", str(one), str(two)), 2, "= 2 trials, over the limit of 1 per comparison")
