"""report.html: one self-contained page per run directory (or several side by side), built from the run's files
alone. The question and verdict, the summary table, learning curves (median and band over seeds, drawn as inline
SVG by report.js: no library, no network), tuning, dynamics, trajectories, the profile, then command, config and
provenance. The tables and verdict are plain HTML, so the page reads with JavaScript off; the PNGs matplotlib drew
are embedded as they are. results.csv, the tidy per-epoch results, is written from the same data."""

from __future__ import annotations

import json
import time
from html import escape
from importlib import resources
from pathlib import Path

import yaml

from optcli.errors import UserError
from optcli.report.format import fmt
from optcli.report.html_tables import aligned_table, differences_table, profile_tables, summary_table, train_table
from optcli.report.html_tables import tuning_table as tuned_table
from optcli.report.page_data import read_run, results_rows
from optcli.rundir.files import atomic_write_text, finite, write_csv

REPORT = "report.html"
RESULTS = "results.csv"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
YLABELS = {
    "train_loss": "training loss",
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
    "val_r2": "validation R²",
}
STATIC = [  # (image, section title, what it answers)
    ("tuning.png", "Tuning", "validation loss against each hyperparameter, and the best so far against the budget"),
    ("dynamics.png", "Dynamics per layer", "gradient norm, update-to-weight ratio and step size per layer"),
    ("trajectories.png", "Trajectories", "each optimizer's path over the 2-D function, from each seed's start"),
]


def _asset(name: str) -> str:
    return resources.files("optcli.report").joinpath(name).read_text(encoding="utf-8")


def _img(b64: str, alt: str) -> str:
    return f'<img class="static" alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def _question(page: dict, section: dict) -> str:
    s = section["summary"]
    if section["kind"] == "train":
        opt = escape(str(s["optimizer"].get("name")))
        return f"How does {opt} train this model over {escape(str(s['epochs_planned']))} epochs?"
    labels = ", ".join(escape(spec["label"]) for spec in s["specs"])
    task = escape(str((section["config"].get("data") or {}).get("name", s["task"])))
    return (
        f"Which of {labels} trains the {task} task best, from the same initial weights and batches, "
        f"over {len(s['seeds'])} seed(s) and {escape(str(s['epochs']))} epochs?"
    )


def _banner(summary: dict, kind: str) -> str:
    status = str(summary.get("status", "completed"))
    if status in ("completed", "stopped_early"):
        return ""
    if kind == "train":
        done = f"{summary.get('epochs_completed')} of {summary.get('epochs_planned')} epochs"
    else:
        trials = summary["trials"]
        finished = sum(t["status"] != "interrupted" for t in trials)
        done = f"{finished} of {len(trials)} trials finished; the curves show the epochs each trial has"
    by = f" by {summary['interrupted_by']}" if summary.get("interrupted_by") else ""
    cls = "banner bad" if status in ("diverged", "failed") else "banner"
    return f'<p class="{cls}"><strong>{escape(status)}{escape(by)}</strong>: {escape(done)}</p>'


def _verdict(section: dict) -> str:
    s = section["summary"]
    if section["kind"] == "train":
        best = s.get("best") or {}
        text = f"{s['status']}: {s.get('epochs_completed')}/{s['epochs_planned']} epochs"
        if best:
            key = "val_loss" if best.get("val_loss") is not None else "train_loss"
            text += f"; best {key.replace('_', ' ')} {fmt(best.get(key))} at epoch {best.get('epoch')}"
        return f'<p class="verdict">{escape(text)}</p>'
    verdicts = [v for v in s.get("verdicts") or [] if isinstance(v, dict)]
    if not verdicts:
        return '<p class="verdict unclear">Fewer than two optimizers completed every seed: no verdict.</p>'
    return "".join(
        f'<p class="verdict{"" if v.get("significant") else " unclear"}">'
        f"<strong>{escape(str(v.get('name')))}</strong>: {escape(str(v.get('text')))}</p>"
        for v in verdicts
    )


def _plots(section: dict, prefix: str, plots: list[dict]) -> str:
    """A div per metric for report.js to draw into, with loss.png for readers without JavaScript."""
    out = []
    for metric, by_label in section["curves"].items():
        pid = f"{prefix}-{metric}"
        series = [
            {"label": label, "color": COLORS[i % len(COLORS)], **s} for i, (label, s) in enumerate(by_label.items())
        ]
        positive = all(v > 0 for s in series for v in s["lo"] + s["mid"])
        log = positive and metric.endswith("loss")
        plots.append(
            {"id": pid, "ylabel": YLABELS.get(metric, metric), "log": log, "log_ok": positive, "series": series}
        )
        out.append(f'<h3>{escape(YLABELS.get(metric, metric))}</h3><div class="plot" id="{escape(pid)}"></div>')
    fallback = section["images"].get("loss.png")
    if fallback:
        out.append(f"<noscript>{_img(fallback, 'loss curves')}</noscript>")
    spread = "One run, one seed." if section["kind"] == "train" else f"Median over seeds, band: {section['band']}."
    intro = f"<p>{escape(spread)} Hover for values; click a name to hide it; drag to zoom, double-click to reset.</p>"
    return intro + "".join(out)


def _section(page: dict, section: dict, prefix: str, plots: list[dict]) -> str:
    s = section["summary"]
    parts = [f"<p class=question>{_question(page, section)}</p>", _banner(s, section["kind"]), _verdict(section)]
    parts.append("<h3>Summary</h3>")
    parts.append(train_table(s) if section["kind"] == "train" else summary_table(s))
    for warning in s.get("warnings") or []:
        parts.append(f'<p class="banner">warning: {escape(str(warning))}</p>')
    parts.append(f"<h3>Learning curves</h3>{_plots(section, prefix, plots)}")
    if isinstance(s.get("tuning"), dict):
        parts.append(f"<h3>Tuned settings</h3>{tuned_table(s['tuning'])}")
    for image, title, what in STATIC:
        if image in section["images"]:
            parts.append(f"<h3>{title}</h3><p>{what}.</p>{_img(section['images'][image], title)}")
    return "".join(parts)


def _run(page: dict, index: int, plots: list[dict], *, heading: bool) -> str:
    parts = [f"<h2>Run {escape(page['name'])}</h2>" if heading else ""]
    parts.append(f'<p class="meta">{escape(page["kind"])} · {escape(page["status"])} · {escape(page["modified"])}</p>')
    for j, section in enumerate(page["sections"]):
        if page["kind"] == "multitask":
            parts.append(f"<h2>Task {escape(section['name'])}</h2>")
        parts.append(_section(page, section, f"p{index}-{j}", plots))
    if page["profile"]:
        parts.append("<h2>Performance profile</h2>" + profile_tables(page["profile"]))
        if "profile.png" in page["images"]:
            parts.append(_img(page["images"]["profile.png"], "performance profile"))
    parts.append(f"<h2>Command</h2><pre>{escape(page['command'])}</pre>")
    configs = [(sec["name"], sec["config"]) for sec in page["sections"]]
    for name, config in configs:
        title = f"Config of {name}" if len(configs) > 1 else "Config"
        parts.append(f"<h3>{escape(title)}</h3><pre>{escape(yaml.safe_dump(config, sort_keys=False))}</pre>")
    parts.append(f"<h3>Provenance</h3><pre>{escape(json.dumps(page['provenance'], indent=2))}</pre>")
    return "".join(parts)


def render(pages: list[dict]) -> str:
    """The whole page: for several runs, what differs between them first, then the optimizers aligned by label."""
    plots: list[dict] = []
    title = "optcli report: " + ", ".join(p["name"] for p in pages)
    body = [f"<h1>{escape(title)}</h1>", '<div id="js-errors"></div>']
    if len(pages) > 1:
        body.append(f"<h2>What differs between the runs</h2>{differences_table(pages)}")
        body.append(f"<h2>Optimizers side by side</h2>{aligned_table(pages)}")
    body += [_run(p, i, plots, heading=len(pages) > 1) for i, p in enumerate(pages)]
    data = json.dumps(finite({"plots": plots}), allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    on_error = (
        "window.addEventListener('error',function(e){document.getElementById('js-errors')"
        ".textContent+='script error: '+e.message+'\\n'});"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_asset("report.css")}</style>'
        f"<script>{on_error}</script></head><body>{''.join(body)}"
        f'<script type="application/json" id="optcli-data">{data}</script>'
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )


def build_report(run_dirs: list[str | Path], *, out: str | Path | None = None) -> dict:
    """report.html from run directories' files (several side by side into `out`, default the first's
    report.html); results.csv next to it when it is one run's own report. Returns where and what it cost."""
    if not run_dirs:
        raise UserError("report: name at least one run directory")
    started = time.perf_counter()
    pages = [read_run(d) for d in run_dirs]
    path = Path(out) if out is not None else Path(run_dirs[0]) / REPORT
    if path.is_dir():
        raise UserError(f"-o {path}: is a directory; name the HTML file to write")
    text = render(pages)
    atomic_write_text(path, text)
    if len(pages) == 1 and out is None:
        write_csv(Path(run_dirs[0]) / RESULTS, [finite(r) for r in results_rows(pages[0])])
    return {"report": str(path), "bytes": len(text.encode()), "seconds": time.perf_counter() - started}


def report_after_run(run_dir: str | Path) -> str | None:
    """Build a finished (or interrupted) run's report; a report that cannot be built is a warning, not a failure."""
    try:
        build_report([run_dir])
    except Exception as exc:  # noqa: BLE001 the run's own files are saved; the page is a convenience on top
        return f"report.html not written ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
    return None
