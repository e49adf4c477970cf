"""A run directory's files gathered into plain data for the report page and results.csv: a comparison, a
comparison over several tasks, or a train run. Every file is read as untrusted, as merge reads it: bounded in
size, parsed strictly, checked against the run-file schema; a missing or tampered file is one UserError line."""

from __future__ import annotations

import base64
import json
import math
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from optcli.config import read_yaml
from optcli.errors import UserError
from optcli.limits import MAX_SUMMARY_BYTES, read_bounded
from optcli.rundir.schema import FORMAT_VERSION, EpochEntry, parse_comparison_summary

IMAGES = ("tuning.png", "dynamics.png", "trajectories.png", "profile.png", "loss.png")  # what matplotlib drew
MAX_IMAGE_BYTES = 20_000_000
CURVE_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_r2")
QUANTILE_SEEDS = 5  # from this many seeds on, the band is the 10-90% quantiles: min-max follows one outlier


def _json(path: Path, what: str) -> Any:
    data = read_bounded(path, limit=MAX_SUMMARY_BYTES, what=what)
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    config = read_yaml(path) if path.exists() else {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a config (the top level is a {type(config).__name__})")
    return config


def _images(run_dir: Path) -> dict[str, str]:
    """The PNGs the run wrote, base64 for <img src="data:...">; a file that is not a PNG is left out."""
    out = {}
    for name in IMAGES:
        path = run_dir / name
        if path.is_file():
            data = read_bounded(path, limit=MAX_IMAGE_BYTES, what="image")
            if data.startswith(b"\x89PNG\r\n\x1a\n"):
                out[name] = base64.b64encode(data).decode("ascii")
    return out


def _modified(path: Path) -> str:
    return datetime.fromtimestamp(os.stat(path).st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _band(values: list[float], n_seeds: int) -> tuple[float, float]:
    if n_seeds >= QUANTILE_SEEDS and len(values) >= 2:
        cuts = statistics.quantiles(values, n=10, method="inclusive")
        return cuts[0], cuts[-1]
    return min(values), max(values)


def _series(histories: list[list[dict]], metric: str, n_seeds: int) -> dict[str, list]:
    """Median and band over seeds per epoch, on three x axes (epoch, median optimizer steps, median seconds)."""
    out: dict[str, list] = {"epoch": [], "steps": [], "seconds": [], "mid": [], "lo": [], "hi": []}
    for e in range(max((len(h) for h in histories), default=0)):
        rows = [h[e] for h in histories if len(h) > e]
        values = [float(v) for r in rows if isinstance(v := r.get(metric), (int, float)) and math.isfinite(v)]
        if not values:
            continue
        lo, hi = _band(values, n_seeds)
        out["epoch"].append(rows[0]["epoch"])
        out["steps"].append(statistics.median(r.get("steps") or 0 for r in rows))
        out["seconds"].append(statistics.median(r.get("train_seconds") or 0.0 for r in rows))
        out["mid"].append(statistics.median(values))
        out["lo"].append(lo)
        out["hi"].append(hi)
    return out


def curves(trials: list[dict], labels: list[str], n_seeds: int) -> dict[str, dict[str, dict]]:
    """metric -> optimizer label -> median and band over seeds, for the metrics some epoch has."""
    out: dict[str, dict[str, dict]] = {}
    for metric in CURVE_METRICS:
        by_label = {
            label: _series([t["epochs"] for t in trials if t["label"] == label], metric, n_seeds) for label in labels
        }
        if any(s["mid"] for s in by_label.values()):
            out[metric] = by_label
    return out


def _section(name: str, summary: dict, run_dir: Path) -> dict:
    labels = [s["label"] for s in summary["specs"]]
    n_seeds = len(summary["seeds"])
    return {
        "name": name,
        "kind": "comparison",
        "summary": summary,
        "curves": curves(summary["trials"], labels, n_seeds),
        "band": "10–90% quantiles" if n_seeds >= QUANTILE_SEEDS else "min–max",
        "images": _images(run_dir),
        "config": _config(run_dir),
    }


def _read_comparison(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return parse_comparison_summary(read_bounded(path, limit=MAX_SUMMARY_BYTES, what="summary"), str(path))


def _multitask(run_dir: Path, raw: dict) -> dict:
    path = run_dir / "summary.json"
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
        raise UserError(f"{path}: not a valid summary of several tasks: tasks: not a list of named tasks")
    for key, kind in (("measures", dict), ("profile", dict), ("taus", list), ("unscored", dict)):
        if not isinstance(raw.get(key), kind):
            raise UserError(f"{path}: not a valid summary of several tasks: {key}: not a {kind.__name__}")
    sections = []
    for task in tasks:
        name = task["name"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{path}: tasks: {name!r} is not a task folder name")
        sections.append(_section(name, _read_comparison(run_dir / name), run_dir / name))
    profile = {k: raw[k] for k in ("measure", "measure_why", "measures", "unscored", "taus", "profile")}
    return {"kind": "multitask", "sections": sections, "profile": profile, "status": _status(sections)}


def _status(sections: list[dict]) -> str:
    statuses = [s["summary"].get("status", "completed") for s in sections]
    return next((s for s in statuses if s != "completed"), "completed")


def _train_epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = read_bounded(path, limit=MAX_SUMMARY_BYTES, what="metrics").decode("utf-8", "replace")
    epochs = []
    for i, line in enumerate(text.splitlines(), start=1):
        try:
            epochs.append(EpochEntry.model_validate(json.loads(line)).model_dump())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "the line"
            raise UserError(f"{path}:{i}: not a valid epoch: {where}: {err['msg']}") from None
    return epochs


def _train(run_dir: Path, raw: dict, config: dict) -> dict:
    path = run_dir / "summary.json"
    if raw.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: summary format {raw.get('format')!r} is not the format {FORMAT_VERSION} this reads")
    for key, kind in (("status", str), ("epochs_planned", int), ("optimizer", dict)):
        if not isinstance(raw.get(key), kind):
            raise UserError(f"{path}: not a valid train summary: {key}: not a {kind.__name__}")
    if not isinstance(raw["optimizer"].get("name"), str):
        raise UserError(f"{path}: not a valid train summary: optimizer.name: not a string")
    label = raw["optimizer"]["name"]
    trial = {"label": label, "seed": config.get("seed", 0), "status": raw["status"], "epochs": _train_epochs(run_dir)}
    section = {
        "name": run_dir.name,
        "kind": "train",
        "summary": raw,
        "trial": trial,
        "curves": curves([trial], [label], 1),
        "band": "one seed",
        "images": _images(run_dir),
        "config": config,
    }
    return {"kind": "train", "sections": [section], "profile": None, "status": raw["status"]}


def read_run(run_dir: str | Path) -> dict:
    """Everything the report shows of one run directory, as plain data (dicts, lists, numbers, strings)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; name a run directory")
    path = run_dir / "summary.json"
    if not path.exists():
        raise UserError(f"{run_dir}: no summary.json; not a run directory (or its run never saved an epoch)")
    config = _config(run_dir)
    raw = _json(path, "summary")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a run summary (the top level is a {type(raw).__name__})")
    if "tasks" in raw:
        page = _multitask(run_dir, raw)
    elif "specs" in raw:
        section = _section(run_dir.name, _read_comparison(run_dir), run_dir)
        page = {"kind": "comparison", "sections": [section], "profile": None, "status": _status([section])}
    else:
        page = _train(run_dir, raw, config)
    first = page["sections"][0]["summary"]
    return {
        **page,
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "config": config,
        "provenance": first.get("provenance") or {},
        "command": first.get("command") or command_of(page, run_dir),
        "modified": _modified(path),
        "images": _images(run_dir) if page["kind"] == "multitask" else {},
    }


def command_of(page: dict, run_dir: Path) -> str:
    """A command that reruns what the files describe, where the run did not record its own: the optimizer specs
    are the labels (a spec with keywords is labelled by its own text), the config is the run's resolved one."""
    sections = page["sections"]
    if page["kind"] == "train":
        return f"optcli train --config {run_dir / 'config.yaml'}"
    summary = sections[0]["summary"]
    labels = " ".join(s["label"] for s in summary["specs"])
    configs = " ".join(f"-c {run_dir / s['name'] / 'config.yaml'}" for s in sections)
    return f"optcli compare {labels} {configs} --seeds {len(summary['seeds'])} --epochs {summary['epochs']}"


def _scalar(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def results_rows(page: dict) -> list[dict]:
    """results.csv: one row per task x optimizer x seed x trained epoch, the same columns in every row."""
    trials = []
    for section in page["sections"]:
        data = section["config"].get("data")
        task = section["name"] if page["kind"] == "multitask" else (data or {}).get("name", section["name"])
        if section["kind"] == "train":
            opt = section["summary"]["optimizer"]
            hps = {k: v for k, v in opt.items() if k not in ("name", "groups")}
            trials.append((task, section["trial"], opt["name"], hps))
            continue
        specs = {s["label"]: s for s in section["summary"]["specs"]}
        for t in section["summary"]["trials"]:
            trials.append((task, t, specs[t["label"]]["name"], specs[t["label"]]["kwargs"]))
    hp_keys = list(dict.fromkeys(k for *_, hps in trials for k in hps))
    rows = []
    for task, t, name, hps in trials:
        for e in t["epochs"]:
            rows.append(
                {"task": task, "optimizer": t["label"], "optimizer_name": name}
                | {f"hp_{k}": _scalar(hps.get(k)) for k in hp_keys}
                | {
                    "seed": t["seed"],
                    "epoch": e["epoch"],
                    "steps": e.get("steps"),
                    "train_seconds": e.get("train_seconds"),
                }
                | {"seconds": e["seconds"], **{k: e.get(k) for k in (*CURVE_METRICS, "lr")}, "status": t["status"]}
            )
    return rows
