"""A comparison over several tasks: each task's tables, then the performance profile as a table and profile.png."""

from __future__ import annotations

import math

from rich.rule import Rule
from rich.table import Table

from optcli.report.format import fmt
from optcli.report.layout import Col, fitted_table


def measures_table(m, *, width: int | None = None) -> Table:
    labels = list(dict.fromkeys(o for by in m.measures.values() for o in by))
    rows = []
    for label in labels:
        cells = []
        for task, by in m.measures.items():
            v, best = by.get(label, math.inf), min(by.values())
            why = m.unscored.get(task, {}).get(label, "not run")
            cells.append(f"[red]{why}[/]" if not math.isfinite(v) else f"{fmt(v)} (×{v / best:.4g})")
        rows.append([label, *cells])
    cols = [Col("optimizer"), *(Col(task, "text", priority=50) for task in m.measures)]
    return fitted_table(f"Per-task measure: {m.measure} (ratio to the task's best)", cols, rows, width=width)


def profile_table(m, *, width: int | None = None) -> Table:
    best = max(rho[0] for rho in m.profile.values())
    rows = [
        [label, *[(f"[bold green]{r:.2f}[/]" if i == 0 and r == best else f"{r:.2f}") for i, r in enumerate(rho)]]
        for label, rho in m.profile.items()
    ]
    # tau = 1 (who is best) and the largest tau (who ever gets close) are the last to be left out
    last = len(m.taus) - 1
    cols = [Col("optimizer")] + [
        Col(f"tau={fmt(tau, 3)}", "num", priority=90 if i == 0 else 85 if i == last else 80 - i)
        for i, tau in enumerate(m.taus)
    ]
    title = f"Performance profile over {len(m.measures)} tasks: fraction of tasks within a factor tau of the best"
    table = fitted_table(title, cols, rows, width=width)
    table.caption = f"measure: {m.measure_why}" + (f"; {table.caption}" if table.caption else "")
    return table


def print_multitask(m, console) -> None:
    from optcli.report.tables import print_comparison

    for name, c in m.tasks:
        console.print(Rule(f"task {name}"))
        print_comparison(c)
    console.print(Rule("across tasks"))
    console.print(measures_table(m))
    console.print(profile_table(m))
    console.print(
        f"wall time {m.wall_seconds:.1f} s; files: {m.run_dir} (profile.png, summary.json, one folder per task)"
    )


def save_profile_plot(taus: list[float], rho: dict[str, list[float]], path, *, measure: str) -> None:
    """profile.png: rho(tau) as a step function per optimizer, tau on a log axis from 1."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optcli.rundir.files import atomic_write_bytes

    top = max(taus) * 1.5 if len(taus) > 1 else 2.0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, values in rho.items():
        ax.step([*taus, top], [*values, values[-1]], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlim(1.0, top)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau (ratio to the best on each task)")
    ax.set_ylabel("fraction of tasks within tau of the best")
    ax.set_title(f"Performance profile ({measure})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
