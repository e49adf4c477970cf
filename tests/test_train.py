import itertools
import json
import subprocess
import sys

import pytest
import torch

from optcli.config import load_config
from optcli.engine.build import build_model_and_optimizer
from optcli.rundir.files import load_checkpoint
from optcli.tasks import load_data
from tests.conftest import cli, mnist_args


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def only_run(tmp_path):
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def test_tutorial_regression_loss_falls_by_orders_of_magnitude(tmp_path, repo_root):
    result = cli("train", "-c", repo_root / "configs" / "tutorial.yaml")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (only_run(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] * 1e-4
    assert summary(only_run(tmp_path))["status"] == "completed"


def test_run_directory_holds_every_file(tmp_path):
    result = cli("train", "--set", "train.epochs=5", "--set", "name=myrun")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "myrun"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",  # the run's lock: empty of meaning once its process ends (see runs.RunLock)
        "config.yaml",
        "last.pt",
        "loss.png",
        "metrics.csv",
        "metrics.jsonl",
        "report.html",  # the page of the run (report/html.py)
        "results.csv",
        "summary.json",
    ]
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,val_loss")
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 6
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "history", "config"}
    assert "run directory: runs/myrun" in result.output.replace("\n", "")


def test_mnist_through_torchvision_on_tiny_idx_files(tiny_mnist, tmp_path):
    result = cli("train", *mnist_args(tiny_mnist, "--set", "train.epochs=8"))
    assert result.exit_code == 0, result.output
    s = summary(only_run(tmp_path))
    assert s["test_accuracy"] > 0.6  # chance is 0.1; the fake digits are easy
    assert s["final"]["val_accuracy"] is not None


def test_mnist_tensors_are_normalized_like_pytorch_examples(tiny_mnist):
    from torchvision import datasets, transforms

    cfg = load_config(
        None,
        [
            "data.name=mnist",
            f"data.root={tiny_mnist}",
            "data.download=false",
            "train.loss=cross_entropy",
            "data.val_fraction=0",
        ],
    )
    data = load_data(cfg.data, torch.device("cpu"))
    reference = datasets.MNIST(
        tiny_mnist,
        train=True,
        download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]),
    )
    image, label = reference[5]
    torch.testing.assert_close(data.train.x[5], image.flatten())
    assert data.train.y[5] == label


def test_same_seed_same_initial_weights_whatever_the_optimizer():
    weights = []
    for spec in (["optimizer.name=sgd", "optimizer.lr=0.1"], ["optimizer.name=rmsprop"]):
        cfg = load_config(None, spec + ["data.samples=16"])
        data = load_data(cfg.data, torch.device("cpu"))
        model, _, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    cfg = load_config(None, ["seed=1", "data.samples=16"])
    other, _, _ = build_model_and_optimizer(cfg, load_data(cfg.data, torch.device("cpu")), torch.device("cpu"))
    assert not torch.equal(other.state_dict()["fc1.weight"], weights[0]["fc1.weight"])


def test_resume_continues_where_it_stopped_and_matches_one_go(tiny_mnist, tmp_path):
    args = mnist_args(tiny_mnist, "--set", "model.dropout=0.3", "--set", "scheduler={name: steplr, step_size: 2}")
    assert cli("train", *args, "--set", "train.epochs=5", "--set", "name=whole").exit_code == 0
    assert cli("train", *args, "--set", "train.epochs=2", "--set", "name=part").exit_code == 0
    part = tmp_path / "runs" / "part"
    assert summary(part)["epochs_completed"] == 2
    result = cli("train", "--resume", part, "--set", "train.epochs=5")
    assert result.exit_code == 0, result.output
    whole = tmp_path / "runs" / "whole"
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(part / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(rows(part)) == strip(rows(whole))
    assert [r["epoch"] for r in rows(part)] == [1, 2, 3, 4, 5]
    assert [r["steps"] for r in rows(part)] == [8 * e for e in range(1, 6)]  # 240 train images / batch 32
    assert all(b["train_seconds"] > a["train_seconds"] for a, b in itertools.pairwise(rows(part)))


@pytest.mark.parametrize(
    "spec",
    [
        ["optimizer.name=LBFGS", "optimizer.lr=1", "optimizer.history_size=5"],
        ["optimizer.name=SGD", "optimizer.lr=1e-4", "optimizer.momentum=0.9", "optimizer.nesterov=true"],
        ["optimizer.name=adamw", "optimizer.groups=[{params: ['*.bias'], weight_decay: 0}]"],
        ["scheduler={name: ReduceLROnPlateau, patience: 1}", "data.val_fraction=0.25"],
        ["scheduler={name: cosineannealinglr}"],
        ["train.grad_clip=1.0", "train.accumulate=2", "data.batch_size=16"],
    ],
)
def test_training_variants_reduce_the_loss(spec, tmp_path):
    result = cli("train", "--set", "train.epochs=20", *[x for s in spec for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (only_run(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_param_group_overrides_by_glob():
    cfg = load_config(
        None,
        [
            "optimizer.name=adamw",
            "optimizer.weight_decay=0.1",
            "optimizer.groups=[{params: ['*.bias'], weight_decay: 0.0}]",
        ],
    )
    data = load_data(cfg.data, torch.device("cpu"))
    _, optimizer, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    by_name = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name == {"fc1.weight": 0.1, "out.weight": 0.1, "fc1.bias": 0.0, "out.bias": 0.0}


def test_divergence_is_a_status_not_a_crash(tmp_path):
    full_batch = ["--set", "data.batch_size=1000"]
    result = cli(
        "train", "--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e6", "--set", "train.epochs=50", *full_batch
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "diverged" in result.output
    s = summary(only_run(tmp_path))
    assert s["status"] == "diverged" and s["diverged_at"]["epoch"] < 50 and s["diverged_at"]["step"] == 1


def test_scheduler_lowers_the_lr_per_epoch(tmp_path):
    result = cli("train", "--set", "train.epochs=4", "--set", "scheduler={name: StepLR, step_size: 1, gamma: 0.5}")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (only_run(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_normal", "orthogonal"])
def test_init_schemes_by_torch_name(init):
    cfg = load_config(None, [f"model.init={init}"])
    data = load_data(cfg.data, torch.device("cpu"))
    model, _, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"))
    default_cfg = load_config(None, [])
    default, _, _ = build_model_and_optimizer(default_cfg, data, torch.device("cpu"))
    assert not torch.equal(model.fc1.weight, default.fc1.weight)
    assert torch.count_nonzero(model.fc1.bias) == 0


def test_optimizers_lists_every_torch_optim_class():
    result = cli("optimizers", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r["defaults"] for r in json.loads(result.output) if r["source"] == "torch.optim"}
    expected = {
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    }
    assert set(rows) == expected
    assert rows["Adam"]["betas"] == [0.9, 0.999] and rows["SGD"]["momentum"] == 0


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "optcli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout


def test_a_run_leaves_the_process_torch_settings_as_it_found_them():
    threads = torch.get_num_threads()
    assert cli("compare", "sgd", "adam", "--set", "train.epochs=2", "--threads", "1").exit_code == 0
    assert cli("train", "--set", "train.epochs=2").exit_code == 0
    assert torch.get_num_threads() == threads
    assert (torch.tensor(1e-40) * 1.0).item() != 0  # subnormals are flushed during a run only


def test_a_ray_workers_trial_leaves_its_process_torch_settings_as_it_found_them():
    """A Ray worker process runs other tasks after a trial: the trial's thread count and flushing end with it."""
    from optcli.compare.runners import OptimizerSpec, _ray_trial
    from optcli.config import load_config

    threads = torch.get_num_threads()
    cfg = load_config(None, ["train.epochs=1", "data.samples=32", "train.flush_denormal=true"])
    history = _ray_trial(cfg.model_dump(mode="json"), OptimizerSpec("sgd", "SGD"), 0, threads + 1)
    assert history.status == "completed"
    assert torch.get_num_threads() == threads
    assert (torch.tensor(1e-40) * 1.0).item() != 0
