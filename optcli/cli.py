"""The optcli command line. Each command parses its arguments, calls one core function and renders the result.
torch is imported only inside command bodies, so `optcli --help` starts instantly."""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from optcli.errors import RunInterrupted, UserError, one_line

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train small PyTorch networks and compare optimizers fairly.",
)

ConfigOpt = typer.Option(
    None, "--config", "-c", metavar="FILE", help="YAML config; the built-in regression task when absent."
)
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE", help="Override a config key: --set optimizer.lr=3e-4 (repeatable)."
)
EpochsOpt = typer.Option(None, "--epochs", metavar="N", help="Override train.epochs.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout instead of tables.")
PrintConfigOpt = typer.Option(False, "--print-config", help="Print the resolved config and exit.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"optcli {version('optcli')}")
        raise typer.Exit()


@app.callback()
def main(
    _version_flag: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print optcli's version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback of any error, a user's mistake included (or OPTCLI_DEBUG=1)."
    ),
) -> None:
    """Train small PyTorch networks and compare optimizers fairly."""
    global _debug
    _debug = debug


_debug = False  # --debug of this invocation, set by main before any command runs

# What a user or their machine causes (a path, a permission, a full or read-only disk, a closed pipe): one line.
# Any other OSError is a bug, and its traceback is what tells where.
USER_ERRNOS = frozenset(
    code
    for name in "ENOENT ENOTDIR EISDIR EEXIST ENAMETOOLONG ELOOP EACCES EPERM EROFS ETXTBSY EBUSY ENOSPC EDQUOT EFBIG "
    "EPIPE EIO".split()
    if (code := getattr(errno, name, None)) is not None  # EDQUOT and ETXTBSY are not on every platform
)


def user_errors(command: Callable) -> Callable:
    """The one place where the tool's errors become a printed line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = command(*args, **kwargs)
            sys.stdout.flush()  # stdout on a full device fails here, while the error can still be reported
            return result
        except (UserError, RunInterrupted, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in USER_ERRNOS:
                raise
            if debugging():
                typer.echo(traceback.format_exc(), err=True, nl=False)
            raise typer.Exit(report_error(exc)) from None

    return wrapper


def debugging() -> bool:
    """--debug on the command line, or OPTCLI_DEBUG set to anything but 0."""
    return _debug or os.environ.get("OPTCLI_DEBUG", "0") not in ("", "0")


def report_error(exc: UserError | RunInterrupted | OSError) -> int:
    """One line on stderr for an error the user can act on; its exit code."""
    if isinstance(exc, UserError):
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    if isinstance(exc, RunInterrupted):
        typer.echo("".join(f"\nwarning: {w}" for w in exc.warnings) + f"\n{exc}", err=True)
        return exc.exit_code
    _drop_stdout()  # nothing more goes to a closed pipe or a full device
    if isinstance(exc, BrokenPipeError):  # the reader went away (optcli ... | head -1): end quietly, as Rich does
        return 1
    # the operating system said no where no core function named the path: stdout
    where = exc.filename or ("stdout" if exc.errno in (errno.ENOSPC, errno.EIO) else "optcli")
    typer.echo(one_line(f"error: {where}: {exc.strerror or exc}"), err=True)
    return 1


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def overrides(set_: list[str] | None, epochs: int | None = None) -> list[str]:
    """--set items, with --epochs N as the last word on train.epochs."""
    return list(set_ or []) + ([f"train.epochs={epochs}"] if epochs is not None else [])


def show(data: Any, json_out: bool, render: Callable[[], None]) -> None:
    """The result as JSON on stdout, or rendered as tables."""
    if json_out:
        from optcli.rundir.files import strict_json

        typer.echo(strict_json(data))
    else:
        render()


def print_config(cfg: Any) -> None:
    from optcli.config import to_yaml

    typer.echo(to_yaml(cfg), nl=False)


@app.command()
@user_errors
def train(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    epochs: int | None = EpochsOpt,
    resume: Path | None = typer.Option(
        None, "--resume", metavar="RUN_DIR", help="Continue runs/<name> from its last.pt."
    ),
    print_config_: bool = PrintConfigOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train the MLP (or your own model) with any optimizer.

    Example: optcli train --config configs/mnist_mlp.yaml --set optimizer.lr=3e-4
    """
    from optcli.config import load_config
    from optcli.errors import UserError
    from optcli.report.progress import TrainProgress
    from optcli.report.tables import print_train_result
    from optcli.rundir import run as runner
    from optcli.rundir.resume import resume_config

    if resume and config:
        raise UserError("--resume continues with the run's own config.yaml; drop --config (use --set to change keys)")
    items = overrides(set_, epochs)
    cfg = resume_config(str(resume), items) if resume else load_config(config, items)
    if print_config_:
        return print_config(cfg)
    with TrainProgress(cfg.train.epochs) as progress:
        result = runner.train_run(
            cfg,
            resume=str(resume) if resume else None,
            on_start=progress.start,
            on_epoch=progress.epoch,
            on_batch=progress.batch,
        )
    if result.primary:  # under torchrun only rank 0 reports
        show(
            {**result.summary, "run_dir": str(result.run_dir), **({"warnings": w} if (w := result.warnings) else {})},
            json_out,
            lambda: print_train_result(result, cfg.train.log_every),
        )
    if result.primary:
        report_line(result.run_dir)
    if result.history.status == "diverged":
        raise typer.Exit(1)


@app.command()
@user_errors
def compare(
    optimizers: list[str] = typer.Argument(
        ..., metavar="OPTIMIZER...", help="Optimizer names with optional settings: sgd:lr=0.1,momentum=0.9"
    ),
    config: list[Path] | None = typer.Option(
        None,
        "--config",
        "-c",
        metavar="FILE",
        help="YAML config (the built-in regression task when absent); repeat it to compare over several tasks.",
    ),
    set_: list[str] | None = SetOpt,
    epochs: int | None = EpochsOpt,
    seeds: int = typer.Option(
        3, "--seeds", metavar="K", help="Repeat every run for this many seeds (config seed, +1, ...)."
    ),
    target: list[str] | None = typer.Option(
        None,
        "--target",
        metavar="METRIC=VALUE",
        help="Time to target: epochs, optimizer steps and seconds until e.g. val_accuracy=0.97 or val_loss=0.1 "
        "(once for every task, or once per --config).",
    ),
    tune: bool = typer.Option(
        False, "--tune", help="Tune each optimizer's hyperparameters first: equal budget, quasi-random, on validation."
    ),
    tune_lr: bool = typer.Option(False, "--tune-lr", help="Tune the learning rate only (the lr-only case of --tune)."),
    tune_budget: int = typer.Option(5, "--tune-budget", metavar="N", help="Trials per optimizer when tuning."),
    tune_storage: str | None = typer.Option(
        None,
        "--tune-storage",
        metavar="URL",
        help="Optuna storage shared by machines: a database URL or a journal file (default: in the run directory).",
    ),
    tune_centre: str = typer.Option(
        "spec",
        "--tune-centre",
        metavar="spec|lr-find",
        help="Centre each lr range on the spec's lr (or default), or on lr-find's suggestion (its steps counted).",
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Run trials in this many processes."),
    threads: int | None = typer.Option(
        None, "--threads", metavar="N", help="torch threads per trial (default: cores, or cores // jobs)."
    ),
    vectorize: bool = typer.Option(
        False, "--vectorize", help="Train the seeds of each optimizer as one stacked model where that is exact."
    ),
    backend: str = typer.Option(
        "local", "--backend", metavar="local|ray", help="ray: every trial a Ray task (RAY_ADDRESS or a local Ray)."
    ),
    print_config_: bool = PrintConfigOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Compare optimizers on the same model, data, initial weights and batch order, over seeds. The config's
    optimizer keywords (file or --set optimizer.KEY=V) are defaults for every optimizer that takes them; a
    spec's own keywords win.

    Example: optcli compare sgd:lr=0.1,momentum=0.9 adam rmsprop --config configs/mnist_mlp.yaml --seeds 3
    Over tasks: optcli compare sgd adam -c configs/regression.yaml -c configs/mnist_mlp.yaml (a performance profile)
    """
    from optcli.compare.comparison import load_compare_config
    from optcli.compare.multitask import MultiTaskComparison, run_compare
    from optcli.compare.options import CompareOptions
    from optcli.compare.runners import TrialCallbacks
    from optcli.report.console import console
    from optcli.report.profile import print_multitask
    from optcli.report.progress import CompareProgress
    from optcli.report.tables import print_comparison

    sources: list[Path | None] = list(config) if config else [None]
    cfgs = [(str(c) if c else None, load_compare_config(c, overrides(set_, epochs))) for c in sources]
    if print_config_:
        for _, cfg in cfgs:
            print_config(cfg)
        return
    options = CompareOptions(
        seeds=seeds,
        targets=tuple(target or ()),
        tune=tune,
        tune_lr=tune_lr,
        tune_budget=tune_budget,
        tune_storage=tune_storage,
        tune_centre=tune_centre,
        jobs=jobs,
        threads=threads,
        vectorize=vectorize,
        backend=backend,
    )
    with CompareProgress(max(c.train.epochs for _, c in cfgs)) as p:
        callbacks = TrialCallbacks(on_trial_start=p.trial_start, on_trial_done=p.trial_done, on_epoch=p.epoch)
        result = run_compare(cfgs, optimizers, options, on_plan=p.plan, callbacks=callbacks)
    if isinstance(result, MultiTaskComparison):
        show(result.to_dict(), json_out, lambda: print_multitask(result, console))
    else:
        show(result.to_dict(), json_out, lambda: print_comparison(result))
    report_line(result.run_dir)
    if code := COMPARE_EXIT_CODES.get(result.status, 0):  # trials that failed with an error (README: How a run ends)
        typer.echo(f"error: {result.status.replace('_', ' ')}: see the failed trials in {result.run_dir}", err=True)
        raise typer.Exit(code)


COMPARE_EXIT_CODES = {"failed": 1, "partly_failed": 3}


@app.command()
@user_errors
def merge(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Comparison run directories to merge."),
    name: str | None = typer.Option(None, "--name", help="Name of the merged run directory."),
    json_out: bool = JsonOpt,
) -> None:
    """Merge comparisons of the same optimizers run apart (other seeds, other machines) into one.

    Example: optcli merge runs/seeds0-1 runs/seeds2-3 --name all-seeds
    """
    from optcli.compare.merge import merge_comparisons
    from optcli.report.tables import print_comparison

    result = merge_comparisons([str(d) for d in run_dirs], name=name)
    show(result.to_dict(), json_out, lambda: print_comparison(result))


@app.command("inspect-params")
@user_errors
def inspect_params(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", metavar="FILE", help="A run's last.pt (or its run directory)."
    ),
    optimizer: str | None = typer.Option(None, "--optimizer", metavar="SPEC", help="Optimizer spec, e.g. sgd:lr=0.1."),
    step: bool = typer.Option(False, "--step", help="Run one batch: gradients, update, SGD rule, accumulation."),
    json_out: bool = JsonOpt,
) -> None:
    """Show parameters, gradients, buffers, param groups and optimizer state of a model.

    Example: optcli inspect-params --optimizer sgd:lr=0.1 --step
    """
    from optcli.config import load_config
    from optcli.errors import UserError
    from optcli.inspection import inspect_params as run_inspect
    from optcli.report.inspection import print_inspection

    if checkpoint and (config or set_):
        raise UserError("--checkpoint carries its own config; drop --config and --set")
    cfg = load_config(config, set_ or [])
    result = run_inspect(cfg, checkpoint=str(checkpoint) if checkpoint else None, optimizer_spec=optimizer, step=step)
    show(result.to_dict(), json_out, lambda: print_inspection(result))


@app.command("lr-find")
@user_errors
def lr_find(
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    optimizer: str | None = typer.Option(
        None, "--optimizer", metavar="SPEC", help="Optimizer spec instead of the config's, e.g. sgd:momentum=0.9."
    ),
    min_lr: float = typer.Option(1e-7, "--min-lr", metavar="LR", help="First learning rate."),
    max_lr: float = typer.Option(10.0, "--max-lr", metavar="LR", help="Last learning rate."),
    steps: int = typer.Option(100, "--steps", metavar="N", help="Training steps, the lr rising exponentially."),
    smoothing: float = typer.Option(0.9, "--smoothing", metavar="BETA", help="EMA factor of the smoothed loss."),
    diverge: float = typer.Option(4.0, "--diverge", metavar="X", help="Stop once the loss exceeds X times its min."),
    rule: str = typer.Option("steepest", "--rule", help="Suggestion: steepest (descent) or minimum (lr at min / 10)."),
    plot: Path = typer.Option(Path("lr_find.png"), "--plot", metavar="FILE", help="Where to write the plot."),
    json_out: bool = JsonOpt,
) -> None:
    """Learning-rate range test: train a fresh model with the lr rising from --min-lr to --max-lr, suggest an lr.

    Example: optcli lr-find -c configs/mnist_mlp.yaml --optimizer sgd:momentum=0.9
    """
    from optcli.config import load_config
    from optcli.lr_find import RangeTestOptions
    from optcli.lr_find import lr_find as run_lr_find
    from optcli.report.tables import print_lr_find

    cfg = load_config(config, set_ or [])
    options = RangeTestOptions(min_lr=min_lr, max_lr=max_lr, steps=steps, beta=smoothing, diverge=diverge, rule=rule)
    result = run_lr_find(cfg, options, optimizer_spec=optimizer, plot=plot)
    show(result.to_dict(), json_out, lambda: print_lr_find(result))


@app.command()
@user_errors
def optimizers(json_out: bool = JsonOpt) -> None:
    """List every optimizer that can be named, with its default hyperparameters.

    Example: optcli optimizers
    """
    from optcli.engine.optimizers import list_optimizers
    from optcli.report.console import console
    from optcli.report.tables import optimizers_table

    rows = list_optimizers()
    show(rows, json_out, lambda: console.print(optimizers_table(rows)))


def report_line(run_dir: str | Path | None) -> None:
    """Where a run's report.html is, on stderr (stdout may be one JSON document), with a file:// link."""
    if run_dir is None:
        return
    path = Path(run_dir) / "report.html"
    if path.is_file():
        typer.echo(f"report: {path} ({path.resolve().as_uri()})", err=True)
    else:
        typer.echo(f"warning: no report.html in {run_dir}; `optcli report {run_dir}` says why", err=True)


@app.command()
@user_errors
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories (train or compare)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", metavar="FILE", help="Where to write the page (default: RUN_DIR/report.html)."
    ),
    json_out: bool = JsonOpt,
) -> None:
    """(Re)build the self-contained HTML report of a run from its files; several runs side by side with -o.

    Example: optcli report runs/before runs/after -o before-after.html
    """
    from optcli.errors import UserError
    from optcli.report.html import build_report

    if len(run_dirs) > 1 and output is None:
        raise UserError("report: several runs go side by side into one page; name it with -o FILE")
    result = build_report([str(d) for d in run_dirs], out=output)
    show(
        result,
        json_out,
        lambda: typer.echo(f"{result['report']} ({result['bytes'] / 1e6:.2f} MB, {result['seconds']:.2f} s)"),
    )


@app.command()
@user_errors
def runs(
    out_dir: Path = typer.Option(Path("runs"), "--out-dir", metavar="DIR", help="The folder runs are written to."),
    json_out: bool = JsonOpt,
) -> None:
    """List the run directories under out_dir, newest first: command, task, optimizers, status, best metric.

    Example: optcli runs --json
    """
    from optcli.report.console import console
    from optcli.report.runs import runs_table
    from optcli.rundir.listing import list_runs

    rows = list_runs(out_dir)
    show(rows, json_out, lambda: console.print(runs_table(rows)))
