"""inspect-params on the terminal: one function per table, and print_inspection to show them in order.

Names and numbers never break mid-word (report/layout.py): only free-text columns wrap, at spaces."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from optcli.report.console import console
from optcli.report.format import fmt
from optcli.report.layout import Col, fitted_table

if TYPE_CHECKING:
    from optcli.inspection import Inspection


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def params_table(inspection: Inspection) -> Table:
    cols = [
        Col("name", "name", 1000),
        Col("shape", "name", 900),
        Col("numel", "num", 800),
        Col("dtype", "name", 300),
        Col("device", "name", 250),
        Col("grad", "name", 950),
    ]
    cols += [Col(k, "num", p) for k, p in (("mean", 700), ("std", 600), ("min", 400), ("max", 400))]
    rows = [
        [
            p["name"],
            _shape(p["shape"]),
            f"{p['numel']:,}",
            p["dtype"],
            p["device"],
            "[green]trainable[/]" if p["requires_grad"] else "[yellow]frozen[/]",
            *(fmt(p[k], 3) for k in ("mean", "std", "min", "max")),
        ]
        for p in inspection.params
    ]
    table = fitted_table(f"Parameters ({inspection.source})", cols, rows)
    note = "grad: requires_grad True (trainable) or False (frozen)"
    table.caption = f"{note}; {table.caption}" if table.caption else note
    return table


def state_dict_table(inspection: Inspection) -> Table:
    cols = [Col("key", "name", 1000), Col("kind", "name", 900), Col("shape", "name", 800), Col("dtype", "name", 700)]
    rows = [
        [e["key"], e["kind"] if e["kind"] == "parameter" else f"[cyan]{e['kind']}[/]", _shape(e["shape"]), e["dtype"]]
        for e in inspection.state_dict
    ]
    return fitted_table("state_dict: what model.state_dict() saves", cols, rows)


def groups_table(inspection: Inspection) -> Table:
    cols = [Col("group", "num", 1000), Col("hyperparameters", "text", 900), Col("parameters held", "text", 800)]
    rows = [
        [
            str(g["index"]),
            ", ".join(f"{k}={v}" for k, v in g["hyperparameters"].items()),
            ", ".join(g["params"]) + f" ({g['numel']:,} elements)",
        ]
        for g in inspection.groups
    ]
    return fitted_table(f"{inspection.optimizer}: param_groups", cols, rows)


def optimizer_state_table(inspection: Inspection) -> Table:
    cols = [
        Col("parameter", "name", 1000),
        Col("key", "name", 900),
        Col("shape", "name", 700),
        Col("norm / value", "num", 800),
    ]
    rows = [
        [s["param"], s["key"], _shape(s["shape"]), fmt(s["norm"]) if s["norm"] is not None else fmt(s["value"])]
        for s in inspection.optimizer_state
    ]
    return fitted_table(f"{inspection.optimizer}: per-parameter state (optimizer.state)", cols, rows)


def modes_table(inspection: Inspection) -> Table:
    cols = [
        Col("module", "name", 1000),
        Col("type", "name", 900),
        Col("training", "name", 800),
        Col("in train()", "text", 700),
        Col("in eval()", "text", 700),
    ]
    rows = [[m["name"], m["type"], str(m["training"]), m["train"], m["eval"]] for m in inspection.modes["modules"]]
    return fitted_table("Modules that behave differently under train() and eval()", cols, rows)


def step_table(step: dict) -> Table:
    cols = [
        Col("parameter", "name", 1000),
        Col("grad norm", "num", 900),
        Col("update norm", "num", 800),
        Col("changed", "name", 700),
    ]
    rows = [
        [
            p["name"],
            fmt(p["grad_norm"]) if p["requires_grad"] else "[yellow]None (frozen)[/]",
            fmt(p["update_norm"]),
            "yes" if p["changed"] else "no",
        ]
        for p in step["params"]
    ]
    return fitted_table(
        f"One step on a batch of {step['batch_size']} (loss {fmt(step['loss'])}): backward() then step()", cols, rows
    )


def linkage_lines(inspection: Inspection) -> list[str]:
    link = inspection.linkage
    if link["ok"]:
        return [
            f"[green]linkage ok[/]: the optimizer holds all {link['trainable']} trainable parameters of the model, "
            f"by identity, and nothing else"
        ]
    return [f"[red]linkage problem[/]: {problem}" for problem in link["problems"]]


def _numbers(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in xs) + "]"


def step_lines(step: dict, *, optimizer: str, lr: float | None) -> list[str]:
    """The SGD rule checked number by number, and what a second backward() without zero_grad() does."""
    rule, acc = step["sgd_rule"], step["accumulation"]
    if rule["applies"]:
        verdict = "[green]holds[/]" if rule["holds"] else "[red]does NOT hold[/]"
        lines = [f"SGD rule w ← w − lr·grad {verdict}: max |w_new − (w − lr·grad)| = {rule['max_abs_error']:.3g}"]
    else:
        lines = [f"SGD rule check: {rule['why']}"]
    for p in step["params"]:
        v = p.get("values")
        if v and v["grad"] is not None:
            if rule["applies"]:
                lines.append(
                    f"{p['name']} ← {p['name']} − lr·dy/d{p['name']}: "
                    f"{_numbers(v['before'])} − {lr:g} × {_numbers(v['grad'])} = {_numbers(v['after'])}"
                )
            else:
                lines.append(
                    f"{p['name']}: {_numbers(v['before'])} with dy/d{p['name']} = {_numbers(v['grad'])} "
                    f"→ {_numbers(v['after'])} after {optimizer}.step()"
                )
    lines.append(
        f"second backward() without zero_grad(): grad norm × {acc['grad_norm_ratio_min']:.6g}"
        f"–{acc['grad_norm_ratio_max']:.6g}, max |g₂ − 2·g₁| = {acc['max_abs_error_vs_2x']:.3g}: "
        + ("gradients add up (doubled)" if acc["doubled"] else "[red]not doubled[/]")
    )
    return lines


def print_inspection(inspection: Inspection) -> None:
    console.print(params_table(inspection))
    totals = inspection.totals
    console.print(
        f"trainable {totals['trainable']:,} · frozen {totals['frozen']:,} · total {totals['total']:,} elements"
    )
    console.print(state_dict_table(inspection))
    console.print(groups_table(inspection))
    if inspection.optimizer_state:
        console.print(optimizer_state_table(inspection))
    else:
        console.print(f"{inspection.optimizer}: per-parameter state is empty (it is created by the first step())")
    for line in linkage_lines(inspection):
        console.print(line)
    training = inspection.modes["training"]
    console.print(f"mode: model.training = {training} ({'train()' if training else 'eval()'})")
    if inspection.optimizer_mode is not None:
        console.print(
            f"optimizer mode: {inspection.optimizer_mode} ({inspection.optimizer} has train()/eval(): it holds other "
            f"weights for training than for evaluation, and optcli switches it with the model)"
        )
    if inspection.modes["modules"]:
        console.print(modes_table(inspection))
    else:
        console.print("no module behaves differently under train() and eval() (no Dropout, no BatchNorm)")
    if inspection.step:
        console.print(step_table(inspection.step))
        lr = inspection.groups[0]["hyperparameters"].get("lr") if inspection.groups else None
        for line in step_lines(inspection.step, optimizer=inspection.optimizer, lr=lr):
            console.print(line)
    for note in inspection.notes:
        console.print(f"note: {note}")
