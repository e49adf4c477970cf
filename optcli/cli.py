"""The optcli command line. Each command parses its arguments, calls one core function and renders
the result. torch is imported only inside command bodies, so `optcli --help` starts instantly."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train small PyTorch networks and compare torch.optim optimizers fairly.")

ConfigOpt = typer.Option(None, "--config", "-c", metavar="FILE", help="YAML config; the built-in regression task when absent.")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a config key: --set optimizer.lr=3e-4 (repeatable).")


def user_errors(command):
    """The one place where the tool's errors become a printed line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from optcli.errors import RunInterrupted, UserError

        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except RunInterrupted as exc:
            typer.echo(f"\n{exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


@app.command()
@user_errors
def train(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR", help="Continue runs/<name> from its last.pt."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
):
    """Train the MLP with any torch.optim optimizer.

    Example: optcli train --config configs/mnist_mlp.yaml --set optimizer.lr=3e-4
    """
    from optcli import report, runner
    from optcli.config import load_config, to_yaml
    from optcli.errors import UserError

    if resume and config:
        raise UserError("--resume continues with the run's own config.yaml; drop --config (use --set to change keys)")
    cfg = runner.resume_config(str(resume), set_ or []) if resume else load_config(config, set_ or [])
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return
    with report.TrainProgress(cfg.train.epochs) as progress:
        result = runner.train_run(cfg, str(resume) if resume else None, progress.start, progress.epoch, progress.batch)
    if result.primary:  # under torchrun only rank 0 reports
        report.print_train_result(result, cfg.train.log_every)
    if result.history.status == "diverged":
        raise typer.Exit(1)


@app.command()
@user_errors
def compare(
    optimizers: List[str] = typer.Argument(..., metavar="OPTIMIZER...", help="torch.optim names with optional settings: sgd:lr=0.1,momentum=0.9"),
    config: Optional[Path] = ConfigOpt,
    seeds: int = typer.Option(1, "--seeds", metavar="K", help="Repeat every run for this many seeds (config seed, +1, ...)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", metavar="N", help="Override train.epochs."),
    set_: Optional[List[str]] = SetOpt,
    tune_lr: bool = typer.Option(False, "--tune-lr", help="Tune each optimizer's lr on the validation split first."),
    tune_budget: int = typer.Option(5, "--tune-budget", metavar="N", help="Learning rates tried per optimizer with --tune-lr."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Run trials in this many processes."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N",
                                          help="torch threads per trial (default: cores, or cores // jobs)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
):
    """Compare optimizers on the same model, data, initial weights and batch order, over seeds.

    Example: optcli compare sgd:lr=0.1,momentum=0.9 adam rmsprop --config configs/mnist_mlp.yaml --seeds 3
    """
    from optcli.config import load_config
    from optcli import report
    from optcli.compare import run_comparison

    cfg = load_config(config, (set_ or []) + ([f"train.epochs={epochs}"] if epochs is not None else []))
    with report.CompareProgress(cfg.train.epochs) as p:
        result = run_comparison(cfg, optimizers, seeds, tune_lr, tune_budget, jobs, threads,
                                p.plan, p.trial_start, p.trial_done, p.epoch)
    show_comparison(result, json_out)


@app.command()
@user_errors
def merge(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...", help="runs/compare-* directories to merge."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the merged run directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
):
    """Merge comparisons of the same optimizers run apart (other seeds, other machines) into one.

    Example: optcli merge runs/compare-seeds0-1 runs/compare-seeds2-3 --name all-seeds
    """
    from optcli.merge import merge_comparisons

    result = merge_comparisons([str(d) for d in run_dirs], name=name)
    show_comparison(result, json_out)


@app.command("inspect-params")
@user_errors
def inspect_params(
    config: Optional[Path] = ConfigOpt,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", metavar="FILE", help="A run's last.pt (or its run directory)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", metavar="SPEC", help="Optimizer spec, e.g. sgd:lr=0.1."),
    step: bool = typer.Option(False, "--step", help="Run one batch: gradients, update, SGD rule, accumulation."),
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Show parameters, gradients, buffers, param groups and optimizer state of a model.

    Example: optcli inspect-params --optimizer sgd:lr=0.1 --step
    """
    from optcli.config import load_config
    from optcli import report
    from optcli.errors import UserError
    from optcli.inspect import inspect_params as run_inspect

    if checkpoint and (config or set_):
        raise UserError("--checkpoint carries its own config; drop --config and --set")
    cfg = load_config(config, set_ or [])
    result = run_inspect(cfg, str(checkpoint) if checkpoint else None, optimizer, step)
    if json_out:
        import json

        typer.echo(json.dumps(result.to_dict(), default=str))
    else:
        report.print_inspection(result)


@app.command()
@user_errors
def optimizers(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List every torch.optim optimizer with its default hyperparameters.

    Example: optcli optimizers
    """
    from optcli import report
    from optcli.optim import list_optimizers

    rows = list_optimizers()
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=2, default=str))
    else:
        report.console.print(report.optimizers_table(rows))


def show_comparison(result, json_out: bool) -> None:
    from optcli import report

    report.save_loss_plot(result, Path(result.run_dir) / "loss.png")
    if json_out:
        import json

        typer.echo(json.dumps(result.to_dict(), default=str))
    else:
        report.print_comparison(result)


