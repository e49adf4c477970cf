"""The report page's tables as HTML: the summary (the terminal's numbers, mean ± std, best highlighted), the
tuned settings, the performance profile, and for runs side by side what differs and the optimizers aligned.
Everything read from a run's files is escaped; each number cell carries its full value in data-value."""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from optcli.report.format import fmt, mean_pm, nbytes, pct
from optcli.report.tables import target_cell

# (key, header, lower is better, as a percentage): the terminal's columns (report/tables.py comparison_table)
METRIC_COLUMNS = [
    ("final_train_loss", "final train loss", True, False),
    ("best_val_loss", "best val loss", True, False),
    ("val_accuracy", "val acc", False, True),
    ("test_accuracy", "test acc", False, True),
    ("val_r2", "val R²", False, False),
    ("final_value", "final f(x, y)", True, False),
    ("distance_to_min", "distance to min", True, False),
]


def cell(text: str, *, value: Any = None, cls: str = "") -> str:
    data = f' data-value="{escape(json.dumps(value))}"' if value is not None else ""
    return f'<td class="{cls}"{data}>{escape(text)}</td>' if cls or data else f"<td>{escape(text)}</td>"


def table(headers: list[str], rows: list[str], *, cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f"<tr>{r}</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _best(rows: list[dict], key: str, lower: bool) -> str | None:
    done = [r for r in rows if _number(r.get(key)) is not None]
    return (min if lower else max)(done, key=lambda r: r[key])["label"] if done else None


def _status(r: dict) -> tuple[str, bool]:
    status = str(r.get("status", ""))
    diverged = r.get("diverged_at") or []
    failed = r.get("failed") or []
    if diverged:
        status += " (" + ", ".join(f"seed {d.get('seed')} epoch {d.get('epoch')}" for d in diverged) + ")"
    status += "".join(f" (seed {f.get('seed')} failed: {f.get('error')})" for f in failed)
    return status, bool(diverged or failed)


def summary_table(summary: dict) -> str:
    """One row per optimizer, as the terminal's comparison table."""
    rows_in = summary["rows"]
    metrics = [m for m in METRIC_COLUMNS if any(_number(r.get(m[0])) is not None for r in rows_in)]
    floor = summary.get("loss_floor")
    has_excess = floor is not None and any(_number(r.get("excess_val_loss")) is not None for r in rows_in)
    target = summary.get("target")
    has_state = any(_number(r.get("state_bytes")) is not None for r in rows_in)
    headers = ["optimizer", "hyperparameters", *(m[1] for m in metrics)]
    headers += [f"excess val loss (floor {fmt(floor)})"] if has_excess else []
    if target:
        relation = ">=" if target.get("higher_is_better") else "<="
        headers.append(f"to {target.get('metric')} {relation} {target.get('value')}")
    headers += ["epochs to best", "s/epoch", *(["optimizer state"] if has_state else []), "status"]
    best = {key: _best(rows_in, key, lower) for key, _, lower, _ in metrics}
    rows = []
    for r in rows_in:
        hps = ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()) or "defaults"
        cells = [cell(r["label"]), cell(hps)]
        for key, _, _, as_pct in metrics:
            cls = "num best" if best[key] == r["label"] else "num"
            cells.append(cell(mean_pm(r.get(key), r.get(key + "_std"), as_pct), value=r.get(key), cls=cls))
        if has_excess:
            cells.append(cell(fmt(r.get("excess_val_loss")), value=r.get("excess_val_loss"), cls="num"))
        if target:
            cells.append(cell(target_cell(r, len(summary["seeds"])), value=r.get("target_steps"), cls="num"))
        cells.append(cell(mean_pm(r.get("epochs_to_best"), r.get("epochs_to_best_std")), cls="num"))
        warm = r.get("seconds_per_epoch_median_warm")  # the median after the cold first epoch, as the terminal's
        cells.append(cell(fmt(warm, 3), value=warm, cls="num"))
        if has_state:
            cells.append(cell(nbytes(r.get("state_bytes")), value=r.get("state_bytes"), cls="num"))
        status, bad = _status(r)
        cells.append(cell(status, cls="bad" if bad else ""))
        rows.append("".join(cells))
    return table(headers, rows, cls="summary")


def train_table(summary: dict) -> str:
    """A train run's outcome, as the terminal's closing line says it."""
    best, final = summary.get("best") or {}, summary.get("final") or {}
    items = [
        ("status", str(summary["status"]), None),
        ("epochs", f"{summary.get('epochs_completed')}/{summary['epochs_planned']}", None),
        ("final train loss", fmt(final.get("train_loss")), final.get("train_loss")),
        ("best val loss", fmt(best.get("val_loss")), best.get("val_loss")),
        ("at epoch", fmt(best.get("epoch")), best.get("epoch")),
        ("best val acc", pct(best.get("val_accuracy")), best.get("val_accuracy")),
        ("best val R²", fmt(best.get("val_r2")), best.get("val_r2")),
        ("test loss", fmt(summary.get("test_loss")), summary.get("test_loss")),
        ("test acc", pct(summary.get("test_accuracy")), summary.get("test_accuracy")),
        ("s/epoch", fmt(summary.get("seconds_per_epoch_median_warm"), 3), summary.get("seconds_per_epoch_median_warm")),
    ]
    rows = [cell(k) + cell(text, value=v, cls="num") for k, text, v in items if text != "—"]
    return table(["", str(summary["optimizer"].get("name"))], rows, cls="summary")


def tuning_table(tuning: dict) -> str:
    """The tuned settings that ran over every seed, per optimizer, and where a winner sits at a range's edge."""
    rows = []
    for label, t in (tuning.get("optimizers") or {}).items():
        best = t.get("best") if isinstance(t, dict) else None
        if not isinstance(best, dict):
            rows.append(cell(str(label)) + cell(str(t.get("note", "no winner")), cls="bad") + cell("—") + cell(""))
            continue
        setting = ", ".join(f"{k}={fmt(v, 3)}" for k, v in (best.get("params") or {}).items())
        edge = ", ".join(f"{e.get('name')} ({e.get('side')})" for e in t.get("at_edge") or [])
        loss = best.get("val_loss")
        rows.append(cell(str(label)) + cell(setting) + cell(fmt(loss), value=loss, cls="num") + cell(edge or "no"))
    intro = (
        f"<p>{escape(str(tuning.get('budget')))} trials per optimizer on seed {escape(str(tuning.get('seed')))}, "
        f"{escape(str(tuning.get('sampler')))}, chosen by {escape(str(tuning.get('selected_by')))}.</p>"
    )
    return intro + table(["optimizer", "winner", "val loss", "edge of the space"], rows)


def profile_tables(profile: dict) -> str:
    """The per-task measure (ratio to each task's best) and rho(tau): the fraction of tasks within tau."""
    labels = list(dict.fromkeys(o for by in profile["measures"].values() for o in by))
    rows = []
    for label in labels:
        cells = [cell(label)]
        for task, by in profile["measures"].items():
            v = _number(by.get(label))
            finite = [x for x in map(_number, by.values()) if x is not None and math.isfinite(x)]
            if v is None or not finite:
                cells.append(cell(str(profile["unscored"].get(task, {}).get(label, "not run")), cls="bad"))
            else:
                cells.append(cell(f"{fmt(v)} (×{v / min(finite):.4g})", value=v, cls="num"))
        rows.append("".join(cells))
    measures = table(["optimizer", *profile["measures"]], rows)
    taus = [f"tau={fmt(t, 3)}" for t in profile["taus"]]
    rho_rows = [
        cell(label) + "".join(cell(f"{r:.2f}", value=r, cls="num") for r in rho)
        for label, rho in profile["profile"].items()
    ]
    why = f"<p>Measure: {escape(str(profile.get('measure_why')))}</p>"
    return measures + why + table(["optimizer", *taus], rho_rows)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def differences(pages: list[dict]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) for every config and provenance key on which the runs disagree."""
    flat = [
        {**{f"config.{k}": v for k, v in flatten(p["config"]).items()}}
        | {f"provenance.{k}": v for k, v in flatten(p["provenance"]).items()}
        for p in pages
    ]
    keys = sorted({k for f in flat for k in f} - {"config.name", "config.out_dir"})
    missing = object()
    return [
        (k, [f.get(k, "(absent)") for f in flat])
        for k in keys
        if any(f.get(k, missing) != flat[0].get(k, missing) for f in flat)
    ]


def differences_table(pages: list[dict]) -> str:
    diff = differences(pages)
    if not diff:
        return "<p>The runs' configs and provenance are the same (name and output folder aside).</p>"
    rows = [
        cell(k) + "".join(cell(json.dumps(v) if not isinstance(v, str) else v) for v in values) for k, values in diff
    ]
    return table(["key", *(p["name"] for p in pages)], rows, cls="diff")


def aligned_table(pages: list[dict]) -> str:
    """Each optimizer (by label) in every run: its best validation loss, else its final training loss."""
    headers = ["task", "optimizer"]
    by_run: list[dict[tuple[str, str], str]] = []
    for page in pages:
        values: dict[tuple[str, str], str] = {}
        for section in page["sections"]:
            s = section["summary"]
            if section["kind"] == "train" and isinstance(s.get("best"), dict):
                key = "val_loss" if s["best"].get("val_loss") is not None else "train_loss"
                values[("", section["trial"]["label"])] = f"{fmt(s['best'].get(key))} (best {key.replace('_', ' ')})"
            for r in s.get("rows") or []:
                key = "best_val_loss" if r.get("best_val_loss") is not None else "final_train_loss"
                values[(section["name"] if page["kind"] == "multitask" else "", r["label"])] = (
                    f"{mean_pm(r.get(key), r.get(key + '_std'))} ({key.replace('_', ' ')})"
                )
        by_run.append(values)
        headers.append(page["name"])
    keys = list(dict.fromkeys(k for values in by_run for k in values))
    rows = [cell(task) + cell(label) + "".join(cell(v.get((task, label), "—")) for v in by_run) for task, label in keys]
    return table(headers, rows)
