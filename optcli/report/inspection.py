"""inspect-params on the terminal: one function per table, and print_inspection to show them in order.

Names and numbers never break mid-word: columns holding them do not wrap (overflow "ellipsis" only as a last
resort), and the free-text columns (hyperparameters, descriptions) are the ones that fold."""

from __future__ import annotations

from rich.table import Table

from optcli.report.console import console
from optcli.report.format import fmt


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _table(title: str, *columns: tuple[str, str]) -> Table:
    """Columns as (header, kind): "name"/"num" cells stay whole on one line; "text" cells wrap at spaces."""
    table = Table(title=title)
    for header, kind in columns:
        if kind == "text":
            table.add_column(header, overflow="fold", ratio=1)
        else:
            table.add_column(header, justify="right" if kind == "num" else "left", no_wrap=True, overflow="ellipsis")
    return table


def params_table(r) -> Table:
    t = _table(
        f"Parameters ({r.source})",
        ("name", "name"),
        ("shape", "name"),
        ("numel", "num"),
        ("dtype", "name"),
        ("grad", "name"),
        ("mean", "num"),
        ("std", "num"),
        ("min", "num"),
        ("max", "num"),
    )
    for p in r.params:
        t.add_row(
            p["name"],
            _shape(p["shape"]),
            f"{p['numel']:,}",
            f"{p['dtype']} {p['device']}",
            "[green]trainable[/]" if p["requires_grad"] else "[yellow]frozen[/]",
            *(fmt(p[k], 3) for k in ("mean", "std", "min", "max")),
        )
    t.caption = "grad: requires_grad is True (trainable) or False (frozen)"
    return t


def state_dict_table(r) -> Table:
    t = _table(
        "state_dict: what model.state_dict() saves",
        ("key", "name"),
        ("kind", "name"),
        ("shape", "name"),
        ("dtype", "name"),
    )
    for e in r.state_dict:
        t.add_row(
            e["key"], e["kind"] if e["kind"] == "parameter" else f"[cyan]{e['kind']}[/]", _shape(e["shape"]), e["dtype"]
        )
    return t


def groups_table(r) -> Table:
    t = _table(
        f"{r.optimizer}: param_groups", ("group", "num"), ("hyperparameters", "text"), ("parameters held", "text")
    )
    for g in r.groups:
        t.add_row(
            str(g["index"]),
            ", ".join(f"{k}={v}" for k, v in g["hyperparameters"].items()),
            ", ".join(g["params"]) + f" ({g['numel']:,} elements)",
        )
    return t


def optimizer_state_table(r) -> Table:
    t = _table(
        f"{r.optimizer}: per-parameter state (optimizer.state)",
        ("parameter", "name"),
        ("key", "name"),
        ("shape", "name"),
        ("norm / value", "num"),
    )
    for s in r.optimizer_state:
        t.add_row(
            s["param"], s["key"], _shape(s["shape"]), fmt(s["norm"]) if s["norm"] is not None else fmt(s["value"])
        )
    return t


def modes_table(r) -> Table:
    t = _table(
        "Modules that behave differently under train() and eval()",
        ("module", "name"),
        ("type", "name"),
        ("training", "name"),
        ("in train()", "text"),
        ("in eval()", "text"),
    )
    for m in r.modes["modules"]:
        t.add_row(m["name"], m["type"], str(m["training"]), m["train"], m["eval"])
    return t


def step_table(r) -> Table:
    s = r.step
    t = _table(
        f"One step on a batch of {s['batch_size']} (loss {fmt(s['loss'])}): backward() then step()",
        ("parameter", "name"),
        ("grad norm", "num"),
        ("update norm", "num"),
        ("changed", "name"),
    )
    for p in s["params"]:
        t.add_row(
            p["name"],
            fmt(p["grad_norm"]) if p["requires_grad"] else "[yellow]None (frozen)[/]",
            fmt(p["update_norm"]),
            "yes" if p["changed"] else "no",
        )
    return t


def linkage_lines(r) -> list[str]:
    link = r.linkage
    if link["ok"]:
        return [
            f"[green]linkage ok[/]: the optimizer holds all {link['trainable']} trainable parameters of the model, "
            f"by identity, and nothing else"
        ]
    return [f"[red]linkage problem[/]: {problem}" for problem in link["problems"]]


def _numbers(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in xs) + "]"


def step_lines(r) -> list[str]:
    rule, acc = r.step["sgd_rule"], r.step["accumulation"]
    if rule["applies"]:
        verdict = "[green]holds[/]" if rule["holds"] else "[red]does NOT hold[/]"
        lines = [f"SGD rule w ← w − lr·grad {verdict}: max |w_new − (w − lr·grad)| = {rule['max_abs_error']:.3g}"]
    else:
        lines = [f"SGD rule check: {rule['why']}"]
    lr = r.groups[0]["hyperparameters"].get("lr") if r.groups else None
    for p in r.step["params"]:
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
                    f"→ {_numbers(v['after'])} after {r.optimizer}.step()"
                )
    lines.append(
        f"second backward() without zero_grad(): grad norm × {acc['grad_norm_ratio_min']:.6g}"
        f"–{acc['grad_norm_ratio_max']:.6g}, max |g₂ − 2·g₁| = {acc['max_abs_error_vs_2x']:.3g}: "
        + ("gradients add up (doubled)" if acc["doubled"] else "[red]not doubled[/]")
    )
    return lines


def print_inspection(r) -> None:
    console.print(params_table(r))
    console.print(
        f"trainable {r.totals['trainable']:,} · frozen {r.totals['frozen']:,} · total {r.totals['total']:,} elements"
    )
    console.print(state_dict_table(r))
    console.print(groups_table(r))
    if r.optimizer_state:
        console.print(optimizer_state_table(r))
    else:
        console.print(f"{r.optimizer}: per-parameter state is empty (it is created by the first step())")
    for line in linkage_lines(r):
        console.print(line)
    console.print(f"mode: model.training = {r.modes['training']} ({'train()' if r.modes['training'] else 'eval()'})")
    if r.optimizer_mode is not None:
        console.print(
            f"optimizer mode: {r.optimizer_mode} ({r.optimizer} has train()/eval(): it holds other weights for "
            f"training than for evaluation, and optcli switches it with the model)"
        )
    if r.modes["modules"]:
        console.print(modes_table(r))
    else:
        console.print("no module behaves differently under train() and eval() (no Dropout, no BatchNorm)")
    if r.step:
        console.print(step_table(r))
        for line in step_lines(r):
            console.print(line)
    for note in r.notes:
        console.print(f"note: {note}")
