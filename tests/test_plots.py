"""What each plot draws, read back from the matplotlib figure a command saves: the lines' data, the axes' labels and
scales, the legend. The figures are caught on their way to disk (report.plots.save_figure), so the commands run
as a user runs them and the data they are checked against is what the same run wrote to its files.

The numbers drawn are the run's own floats, so most checks are exact. Where the test recomputes a mean over seeds
(statistics.fmean in the core, sum/len here), the two may differ in the last bit of a float64: rel=1e-12."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from optcli.report.profile import profile_figure
from optcli.report.tuning import tuning_figure
from tests.conftest import cli, mnist_args

MEAN = 1e-12  # a float64 mean recomputed in another order (module docstring)


@pytest.fixture
def drawn(monkeypatch):
    """file name -> the figure a command saved under it (the PNG is still written)."""
    import optcli.report.plots as plots

    figures = {}
    save = plots.save_figure

    def keep(fig, path, **kwargs):
        figures[Path(path).name] = fig
        save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_train_run_draws_its_losses_and_the_lr_on_its_own_axis(drawn, tmp_path):
    result = cli("train", "--epochs", "3", "--set", "name=reg", "--set", "scheduler={name: steplr, step_size: 1}")
    assert result.exit_code == 0, result.output
    rows = jsonl(tmp_path / "runs" / "reg" / "metrics.jsonl")
    fig = drawn["loss.png"]
    loss_ax, lr_ax = fig.axes  # no accuracy panel on a regression: the loss axes and its twin for the lr
    lines = lines_by_label(loss_ax)
    assert list(lines) == ["train loss", "validation loss"]
    assert list(lines["train loss"].get_xdata()) == [1, 2, 3]
    assert list(lines["train loss"].get_ydata()) == [r["train_loss"] for r in rows]
    assert list(lines["validation loss"].get_ydata()) == [r["val_loss"] for r in rows]
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == [r["lr"] for r in rows]
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"] * 0.1)  # StepLR's gamma: the lr line is not flat
    assert loss_ax.get_yscale() == lr_ax.get_yscale() == "log"
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("epoch", "loss (log scale)")
    assert lr_ax.get_ylabel() == "learning rate (log scale)"
    assert legend_texts(loss_ax) == ["train loss", "validation loss", "lr"]
    assert loss_ax.get_title() == "Training run: 3 epochs, completed"
    assert (tmp_path / "runs" / "reg" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_classification_run_adds_a_validation_accuracy_panel(drawn, tiny_mnist, tmp_path):
    result = cli("train", *mnist_args(tiny_mnist, "--epochs", "2", "--set", "name=mnist"))
    assert result.exit_code == 0, result.output
    rows = jsonl(tmp_path / "runs" / "mnist" / "metrics.jsonl")
    loss_ax, acc_ax, _lr_ax = drawn["loss.png"].axes
    (acc_line,) = acc_ax.get_lines()
    assert list(acc_line.get_ydata()) == [100 * r["val_accuracy"] for r in rows]
    assert acc_ax.get_ylabel() == "validation accuracy (%)" and acc_ax.get_xlabel() == "epoch"
    assert list(lines_by_label(loss_ax)["train loss"].get_ydata()) == [r["train_loss"] for r in rows]


def test_a_comparison_draws_its_losses_and_dynamics(drawn, tmp_path):
    result = cli("compare", "sgd", "adam", "--seeds", "2", "--epochs", "3", "--set", "name=c")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    check_loss_plot(drawn["loss.png"], summary)
    check_dynamics_plot(drawn["dynamics.png"], summary)


def seed_values(summary: dict, label: str, value) -> list[list[float]]:
    """Per seed of one optimizer, one value per epoch."""
    return [[value(e) for e in t["epochs"]] for t in summary["trials"] if t["label"] == label]


def check_loss_plot(fig, summary: dict) -> None:
    """Each optimizer's mean loss over the seeds, and the seeds' spread as a band around it."""
    train_ax, val_ax = fig.axes
    for ax, kind, name in ((train_ax, "train_loss", "training"), (val_ax, "val_loss", "validation")):
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ("epoch", f"{name} loss", "log")
        assert legend_texts(ax) == ["sgd", "adam"]
        lines = lines_by_label(ax)
        for label, band in zip(["sgd", "adam"], ax.collections, strict=True):
            per_seed = seed_values(summary, label, lambda e, kind=kind: e[kind])
            assert len(per_seed) == 2
            means = [sum(values) / len(values) for values in zip(*per_seed, strict=True)]
            assert list(lines[label].get_xdata()) == [1, 2, 3]
            assert list(lines[label].get_ydata()) == pytest.approx(means, rel=MEAN)
            # the band spans min to max over the seeds
            ys = band.get_paths()[0].vertices[:, 1]
            assert ys.min() == min(map(min, per_seed)) and ys.max() == max(map(max, per_seed))
            assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(_rgb(lines[label]))  # the band of its line


def _rgb(line) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(line.get_color())


def check_dynamics_plot(fig, summary: dict) -> None:
    """Every measure of every layer, one line per optimizer: the mean over the seeds."""
    from optcli.report.plots import DYNAMICS

    layers = list(summary["trials"][0]["epochs"][0]["dynamics"]["layers"])
    assert len(layers) >= 2 and len(fig.axes) == len(DYNAMICS) * len(layers)
    for row, (key, what) in enumerate(DYNAMICS):
        for col, layer in enumerate(layers):
            ax = fig.axes[row * len(layers) + col]
            assert ax.get_title() == f"{layer}: {what}" and ax.get_yscale() == "log"
            lines = lines_by_label(ax)
            assert list(lines) == ["sgd", "adam"]
            for label, line in lines.items():
                per_seed = seed_values(
                    summary, label, lambda e, key=key, layer=layer: e["dynamics"]["layers"][layer][key]
                )
                means = [sum(values) / len(values) for values in zip(*per_seed, strict=True)]
                assert list(line.get_ydata()) == pytest.approx(means, rel=MEAN)
                assert all(v > 0 for v in line.get_ydata())
    assert legend_texts(fig.axes[0]) == ["sgd", "adam"]


def test_trajectories_draw_each_seeds_path_from_its_start_on_the_contours(drawn, tmp_path, repo_root):
    config = repo_root / "configs" / "rosenbrock.yaml"
    result = cli("compare", "sgd", "adam:lr=0.05", "-c", config, "--epochs", "8", "--seeds", "2", "--set", "name=r")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    function = summary["function"]
    (ax,) = drawn["trajectories.png"].axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "y")
    assert list(ax.get_xlim()) == function["box"][:2] and list(ax.get_ylim()) == function["box"][2:]
    assert len(ax.collections) >= 2  # the filled contours and their lines
    paths = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert len(paths) == 4  # one per optimizer and seed
    by_optimizer = sorted(summary["trials"], key=lambda t: ["sgd", "adam:lr=0.05"].index(t["label"]))
    for line, trial in zip(paths, by_optimizer, strict=True):  # drawn optimizer by optimizer
        start = function["starts"][str(trial["seed"])]
        xs = [start[0]] + [e["position"]["x"] for e in trial["epochs"]]
        ys = [start[1]] + [e["position"]["y"] for e in trial["epochs"]]
        assert list(line.get_xdata()) == xs and list(line.get_ydata()) == ys
    assert legend_texts(ax) == ["sgd", "adam:lr=0.05"]
    star = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in star] == [tuple(function["minimum"])]


def test_the_lr_find_plot_draws_raw_and_smoothed_loss_and_marks_the_suggestion(drawn, tmp_path):
    args = ("lr-find", "--steps", "40", "--min-lr", "1e-6", "--max-lr", "100", "--plot", "lrf.png", "--json")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    (ax,) = drawn["lrf.png"].axes
    lines = lines_by_label(ax)
    assert list(lines["batch loss"].get_xdata()) == found["lrs"]
    assert list(lines["batch loss"].get_ydata()) == found["losses"]
    assert list(lines["smoothed"].get_ydata()) == found["smoothed"]
    suggestion = next(line for label, line in lines.items() if label.startswith("suggestion (steepest)"))
    assert list(suggestion.get_xdata()) == [found["suggestion"]] * 2  # a vertical line at the suggested lr
    lowest = next(line for label, line in lines.items() if label.startswith("lowest loss"))
    assert lowest.get_xdata()[0] == found["min_loss_lr"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "training loss"
    assert ax.get_xlabel() == "learning rate (log scale)"
    assert legend_texts(ax)[:2] == ["batch loss", "smoothed"]


def _tuning() -> dict:
    def trial(number, lr, val_loss):
        return {"number": number, "params": {"lr": lr}, "val_loss": val_loss, "status": "completed"}

    trials = [trial(0, 1e-2, 0.5), trial(1, 1e-3, None), trial(2, 3e-2, 0.2), trial(3, 1e-1, 0.3)]
    trials[1]["status"] = "diverged"
    return {
        "budget": 4,
        "optimizers": {
            "sgd": {
                "space": [{"name": "lr", "low": 1e-4, "high": 1.0, "log": True}],
                "trials": trials,
                "best": trials[2],
            }
        },
    }


def test_the_tuning_plot_draws_every_trial_the_winner_and_the_best_so_far():
    fig = tuning_figure(_tuning())
    space_ax, best_ax = fig.axes
    done, failed, star = space_ax.collections
    assert done.get_offsets().tolist() == [[1e-2, 0.5], [3e-2, 0.2], [1e-1, 0.3]]
    assert failed.get_offsets().tolist() == [[1e-3, 0.5]]  # a failed trial sits on the top edge
    assert star.get_offsets().tolist() == [[3e-2, 0.2]]
    assert (space_ax.get_xlabel(), space_ax.get_ylabel()) == ("lr", "sgd\nval loss")
    assert space_ax.get_xscale() == space_ax.get_yscale() == "log"
    assert space_ax.get_xlim() == pytest.approx((1e-4 / 1.15, 1.15))
    (curve,) = best_ax.get_lines()
    assert list(curve.get_xdata()) == [1, 2, 3, 4]
    assert list(curve.get_ydata()) == [0.5, 0.5, 0.2, 0.2]  # the running minimum over trials spent
    assert (best_ax.get_xlabel(), best_ax.get_ylabel()) == ("trials spent", "best val loss so far")


def test_the_tuning_plot_leaves_a_missing_best_so_far_blank():
    tuning = _tuning()
    sgd = tuning["optimizers"]["sgd"]
    sgd["trials"] = [{**t, "val_loss": None} for t in sgd["trials"]]
    sgd["best"] = None
    (_, best_ax) = tuning_figure(tuning).axes
    assert all(math.isnan(v) for v in best_ax.get_lines()[0].get_ydata())


def test_the_profile_plot_draws_each_optimizers_rho_as_steps_from_tau_1():
    taus = [1.0, 2.0, 4.0]
    rho = {"sgd": [0.5, 0.5, 1.0], "adam": [0.5, 1.0, 1.0]}
    (ax,) = profile_figure(taus, rho, measure="best_val_loss").axes
    lines = lines_by_label(ax)
    assert list(lines) == ["sgd", "adam"]
    for label, values in rho.items():
        assert list(lines[label].get_xdata()) == [*taus, 6.0]  # held to the right edge, 1.5 x the last tau
        assert list(lines[label].get_ydata()) == [*values, values[-1]]
        assert lines[label].get_drawstyle() == "steps-post"
    assert ax.get_xscale() == "log" and ax.get_xlim() == (1.0, 6.0)
    assert ax.get_ylabel() == "fraction of tasks within tau of the best"
    assert ax.get_title() == "Performance profile (best_val_loss)"
    assert legend_texts(ax) == ["sgd", "adam"]
    assert np.all(np.diff(lines["adam"].get_ydata()) >= 0)
