"""The run directories under an output folder, newest first, each described from its own summary.json: what made
it (train, compare, compare over tasks, merge), the task, the optimizers, the status, its best metric and when.
A directory whose summary cannot be read is listed as unreadable with the reason, never fatal to the listing."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from optcli.config import read_yaml
from optcli.errors import UserError
from optcli.limits import MAX_SUMMARY_BYTES, read_bounded


def _best(rows: list[dict]) -> tuple[str, float] | None:
    """The lowest mean best-validation loss over the optimizers (final training loss without validation)."""
    for key in ("best_val_loss", "final_train_loss"):
        values = [(r.get("label"), r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        values = [(label, v) for label, v in values if math.isfinite(v)]
        if values:
            label, value = min(values, key=lambda lv: lv[1])
            return f"{key} {label}", value
    return None


def _describe(summary: dict, name: str) -> dict[str, Any]:
    if "tasks" in summary:
        tasks = [t for t in summary.get("tasks") or [] if isinstance(t, dict)]
        labels = [s.get("label") for s in (tasks[0].get("specs") or [])] if tasks else []
        statuses = [t.get("status", "completed") for t in tasks]
        return {
            "command": "compare (tasks)",
            "task": ", ".join(str(t.get("name")) for t in tasks),
            "optimizers": labels,
            "status": next((s for s in statuses if s != "completed"), "completed"),
            "best": None,
        }
    if "specs" in summary:
        best = _best([r for r in summary.get("rows") or [] if isinstance(r, dict)])
        return {
            "command": "merge" if name.startswith("compare-merged-") else "compare",
            "task": summary.get("task"),
            "optimizers": [s.get("label") for s in summary["specs"] if isinstance(s, dict)],
            "status": summary.get("status", "completed"),
            "best": {"metric": best[0], "value": best[1]} if best else None,
        }
    best_epoch: dict = summary["best"] if isinstance(summary.get("best"), dict) else {}
    value = best_epoch.get("val_loss") if best_epoch.get("val_loss") is not None else best_epoch.get("train_loss")
    metric = "best_val_loss" if best_epoch.get("val_loss") is not None else "best_train_loss"
    optimizer: dict = summary["optimizer"] if isinstance(summary.get("optimizer"), dict) else {}
    return {
        "command": "train",
        "task": None,
        "optimizers": [optimizer.get("name")],
        "status": summary.get("status"),
        "best": {"metric": metric, "value": value} if value is not None else None,
    }


def describe_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    stamp = os.stat(path).st_mtime
    row: dict[str, Any] = {
        "name": run_dir.name,
        "path": str(run_dir),
        "date": datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "timestamp": stamp,
    }
    try:
        summary = json.loads(read_bounded(path, limit=MAX_SUMMARY_BYTES, what="summary").decode("utf-8"))
        if not isinstance(summary, dict):
            raise ValueError(f"the top level is a {type(summary).__name__}")
        row |= _describe(summary, run_dir.name)
        row["report"] = str(run_dir / "report.html") if (run_dir / "report.html").is_file() else None
    except (UserError, ValueError, RecursionError, AttributeError, TypeError) as exc:
        row |= {"command": None, "task": None, "optimizers": [], "status": f"unreadable ({str(exc)[:120]})"}
        row |= {"best": None, "report": None}
    if row["command"] in ("train", "compare", "merge"):
        row["task"] = _data_name(run_dir) or row["task"]
    return row


def _data_name(run_dir: Path) -> str | None:
    """The task by its data.name in config.yaml (the summary says only the kind: regression, classification)."""
    try:
        config = read_yaml(run_dir / "config.yaml")
    except UserError:
        return None
    data = config.get("data") if isinstance(config, dict) else None
    return str(data["name"]) if isinstance(data, dict) and "name" in data else None


def list_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every folder of out_dir with a summary.json, newest summary first."""
    out = Path(out_dir)
    if not out.exists():
        raise UserError(f"{out}: no such directory (runs are written under out_dir, runs by default)")
    if not out.is_dir():
        raise UserError(f"{out}: not a directory")
    runs = [describe_run(d) for d in out.iterdir() if d.is_dir() and (d / "summary.json").is_file()]
    return sorted(runs, key=lambda r: r["timestamp"], reverse=True)
