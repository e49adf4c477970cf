"""optcli performance benchmark: prints each figure, its ratio and its target; exits 1 when a target is missed.

Promises checked (all as ratios measured in this one run, on this machine, never as absolute times):
  1. An MNIST epoch of configs/mnist_mlp.yaml (784-512-512-10, batch 128, Adam, dropout 0.2), as a user sees it
     (`optcli train --set train.epochs=2`: epoch 2's `seconds` in metrics.csv, validation included), takes at most
     1.5x the strict limit: the 8 matmuls one step cannot avoid (3 forward products, 3 weight gradients, 2 input
     gradients), each timed hot at its own shape and layout, times the epoch's steps; and the training loop alone
     a) at most 0.30 of the canonical loop's time (torchvision MNIST + ToTensor/Normalize + DataLoader(shuffle=True),
        the same model written plainly, torch.optim.Adam with its defaults), and
     b) at most 1.5x the compute limit: the epoch's forward and backward matmul FLOPs divided by the FLOP/s that
        torch.matmul reaches here for those same shapes.
  2. `optcli --help` and `optcli compare --help` start in at most 0.3 s (median of several starts).
  3. `compare` of 3 optimizers x 3 seeds spends at most 10% of its wall time outside the training epochs.
  4. An MNIST training peaks at most 1.5 GB resident.
  5. A 3-optimizer x 5-seed comparison with the seeds stacked (`--vectorize`) takes at least 4x less training time
     (the sum of the trials' train_seconds) than the plain path on the regression task (200 epochs), and at least
     1.5x less on MNIST with model.hidden=[128]; it also prints torch.func's stacking of the same MLP taken as a
     user's model, and the largest relative difference of any per-epoch metric, stacked against plain.
It also reports the speed-up of `compare --jobs 2` over the serial run (no target), and (no targets either):
  6. that regression comparison's wall time serial, with --jobs 2, and with --backend ray on a local 2-CPU Ray;
  7. what `optcli train` on the default task costs before it trains: python, import torch, torch._dynamo;
  8. what a user waits for: the first MNIST epoch against the median of the later ones, and the wall time of
     `optcli train` (MNIST) and `optcli compare` (default task) split into imports, data, training and writing;
  9. a user's Dataset (MNIST through one __getitem__ per sample) held in memory against streamed through a
     DataLoader with num_workers 0 and 2: the loading pass and one epoch each (--only stream).
The epoch section runs once per instruction set the CPU has (AVX2; AVX-512 too where present, by
ATEN_CPU_CAPABILITY and MKL_ENABLE_INSTRUCTIONS in a child process).

The in-process training loops train on all 60,000 training images (val_fraction 0), after one warm-up epoch; the
user's epoch is a fresh `optcli train` on the config as it is (54,000 training images); times are medians.
Run from the repository root:  python benchmarks/perf.py [--data-root ../shared/data] [--epochs 3] [--compile]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optcli.config import load_config  # noqa: E402
from optcli.engine.build import build_model_and_optimizer, torch_settings  # noqa: E402
from optcli.engine.loop import grad_scaler, make_loss, train_one_epoch  # noqa: E402
from optcli.engine.stepping import StepSettings, make_step  # noqa: E402
from optcli.tasks import batches, epoch_permutation, load_data  # noqa: E402

BATCH = 128
results: list[tuple[str, float, float, bool]] = []  # (what, ratio, target, met)


def check(what: str, ratio: float, target: float) -> None:
    met = ratio <= target
    results.append((what, ratio, target, met))
    print(f"  -> {what}: ratio {ratio:.3f} (target <= {target}) {'MET' if met else 'MISSED'}")


def machine() -> str:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device cpu, Python {platform.python_version()}"
    )


def optcli_config(data_root: str, *extra: str):
    return load_config(
        ROOT / "configs" / "mnist_mlp.yaml",
        [f"data.root={data_root}", "data.download=false", "data.val_fraction=0", "device=cpu", *extra],
    )


def time_optcli_epochs(data_root: str, epochs: int, *extra: str) -> list[float]:
    cfg = optcli_config(data_root, *extra)
    with torch_settings(cfg):  # the process settings a run gets (flush_denormal)
        return _time_epochs(cfg, epochs)


def _time_epochs(cfg, epochs: int) -> list[float]:
    device = torch.device("cpu")
    data = load_data(cfg.data, device)
    model, optimizer, _ = build_model_and_optimizer(cfg, data, device)
    run_model = torch.compile(model) if cfg.train.compile else model
    loss_fn = make_loss(cfg)
    times = []
    for epoch in range(epochs + 1):  # epoch 0 is the warm-up
        t0 = time.perf_counter()
        perm = epoch_permutation(len(data.train), 0, epoch, device)
        settings = StepSettings(precision=cfg.train.precision)
        step = make_step(run_model, optimizer, loss_fn, settings, grad_scaler(cfg.train.precision, device))
        losses = train_one_epoch(step, batches(data.train, BATCH, perm), n_batches=math.ceil(len(data.train) / BATCH))
        losses.sum().item()  # the one host sync of the epoch
        times.append(time.perf_counter() - t0)
    return times[1:]


def time_canonical_epochs(data_root: str, epochs: int) -> list[float]:
    """The loop users would otherwise write (pytorch/examples mnist/main.py), kept plain on purpose."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(data_root, train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for epoch in range(epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if epoch == 0 and i == 100:
                break  # a short warm-up: the full epoch costs ~10 s
        times.append(time.perf_counter() - t0)
    return times[1:]


def matmul_shapes(n: int, widths=(784, 512, 512, 10)) -> list[tuple[tuple[int, int, int], int]]:
    """((m, k, n), count) of every matmul an epoch performs: forward x@W.T per layer; backward the weight
    gradient g.T@h per layer and the input gradient g@W for every layer but the first (its input needs no grad)."""
    full, rest = divmod(n, BATCH)
    shapes: dict[tuple[int, int, int], int] = {}
    for b, count in ((BATCH, full), (rest, 1 if rest else 0)):
        for i in range(len(widths) - 1):
            fan_in, fan_out = widths[i], widths[i + 1]
            for shape in [(b, fan_in, fan_out), (fan_out, b, fan_in)] + ([(b, fan_out, fan_in)] if i > 0 else []):
                shapes[shape] = shapes.get(shape, 0) + count
    return list(shapes.items())


def _hot_seconds(fn) -> float:
    """Median seconds of one call of `fn`, hot (its operands in cache, after a warm-up)."""
    for _ in range(20):
        fn()
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        samples.append((time.perf_counter() - t0) / 50)
    return statistics.median(samples)


def step_matmuls(batch: int, widths=(784, 512, 512, 10)) -> dict[str, float]:
    """Seconds of each matmul one optimizer step of the MLP cannot avoid, timed hot at its own shape and layout as
    autograd runs it: x @ W.T per layer (forward), g.T @ h per layer (weight gradient), g @ W for every layer but
    the first (input gradient; the batch itself needs none). 8 products for 784-512-512-10."""
    times = {}
    for i in range(len(widths) - 1):
        fan_in, fan_out = widths[i], widths[i + 1]
        h, w, g = torch.randn(batch, fan_in), torch.randn(fan_out, fan_in), torch.randn(batch, fan_out)
        times[f"forward {batch}x{fan_in} @ ({fan_out}x{fan_in}).T"] = _hot_seconds(lambda h=h, w=w: h @ w.t())
        times[f"weight grad ({batch}x{fan_out}).T @ {batch}x{fan_in}"] = _hot_seconds(lambda g=g, h=h: g.t() @ h)
        if i > 0:
            times[f"input grad {batch}x{fan_out} @ {fan_out}x{fan_in}"] = _hot_seconds(lambda g=g, w=w: g @ w)
    return times


def strict_limit(n_train: int) -> tuple[float, dict[str, float]]:
    """The strict per-shape compute limit of one epoch over n_train samples: each step's 8 matmuls (step_matmuls),
    times the steps (the last, smaller batch timed at its own size); and the per-step times at batch 128."""
    full, rest = divmod(n_train, BATCH)
    per_step = step_matmuls(BATCH)
    seconds = full * sum(per_step.values()) + (sum(step_matmuls(rest).values()) if rest else 0.0)
    return seconds, per_step


def compute_limit(n: int) -> tuple[float, float]:
    """(seconds, FLOPs) of the epoch's matmuls at the rate torch.matmul reaches for each shape here."""
    seconds = flops = 0.0
    for (m, k, p), count in matmul_shapes(n):
        a, b = torch.randn(m, k), torch.randn(k, p)
        per_call = _hot_seconds(lambda a=a, b=b: torch.matmul(a, b))
        seconds += per_call * count
        flops += 2.0 * m * k * p * count
    return seconds, flops


def user_epochs(data_root: str, runs: int, out_dir: str) -> list[float]:
    """The epoch as a user sees it: `optcli train -c configs/mnist_mlp.yaml --set train.epochs=2`'s second epoch,
    the `seconds` column of metrics.csv (training and validation), one fresh process per run."""
    seconds = []
    for i in range(runs):
        name = f"user-epoch-{i}"
        cmd = [sys.executable, "-m", "optcli", "train", "-c", str(ROOT / "configs" / "mnist_mlp.yaml")]
        for setting in (f"data.root={data_root}", "data.download=false", "device=cpu", "train.epochs=2"):
            cmd += ["--set", setting]
        cmd += ["--set", f"out_dir={out_dir}", "--set", f"name={name}"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        seconds.append(epoch_seconds(ROOT / out_dir / name)[1])
        shutil.rmtree(ROOT / out_dir / name, ignore_errors=True)
    return seconds


def cli_start_times(args: list[str], runs: int = 7) -> list[float]:
    exe = shutil.which("optcli")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "optcli", *args]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


COMPARE_SNIPPET = """
import json, sys, time, torch
from optcli.config import load_config
from optcli.compare.comparison import run_comparison
from optcli.compare.options import CompareOptions
opts = json.loads(sys.argv[1])
cfg = load_config(opts["config"], opts["overrides"])
t0 = time.perf_counter()
c = run_comparison(cfg, opts["specs"], CompareOptions(seeds=opts["seeds"], jobs=opts["jobs"],
                   threads=opts["threads"] or None, backend=opts["backend"]))
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "epoch_seconds": c.epoch_seconds, "jobs": c.jobs, "run_dir": c.run_dir,
                  "losses": [[e.train_loss for e in t.history.epochs] for t in c.trials]}))
"""


def run_compare(
    data_root: str,
    epochs: int,
    jobs: int,
    out_dir: str,
    threads: int = 0,
    *,
    config: str | None = str(ROOT / "configs" / "mnist_mlp.yaml"),
    specs: tuple[str, ...] = ("sgd", "adam", "rmsprop"),
    seeds: int = 3,
    backend: str = "local",
) -> dict:
    """One comparison in a fresh process; its wall time is taken inside, around run_comparison."""
    overrides = [f"train.epochs={epochs}", f"out_dir={out_dir}", "device=cpu"]
    if config is not None and "mnist" in config:
        overrides += [f"data.root={data_root}", "data.download=false"]
    opts = {
        "config": config,
        "overrides": overrides,
        "specs": list(specs),
        "seeds": seeds,
        "jobs": jobs,
        "threads": threads,
        "backend": backend,
    }
    out = subprocess.run(
        [sys.executable, "-c", COMPARE_SNIPPET, json.dumps(opts)], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


PEAK_SNIPPET = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(data_root: str, out_dir: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "optcli",
        "train",
        "--config",
        str(ROOT / "configs" / "mnist_mlp.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        "data.download=false",
        "--set",
        "train.epochs=1",
        "--set",
        f"out_dir={out_dir}",
        "--set",
        "device=cpu",
    ]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SNIPPET, *cmd], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return int(out.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def instruction_sets() -> list[str]:
    """The instruction sets torch can run here: avx2, and avx512 where the CPU has it."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return ["avx2"] + (["avx512"] if "avx512f" in flags else [])


def epoch_sections(data_root: str, args) -> None:
    """The epoch section once per instruction set: in this process when there is one, else in a child process per
    set, since torch reads ATEN_CPU_CAPABILITY (and MKL its MKL_ENABLE_INSTRUCTIONS) once, at import."""
    isas = instruction_sets()
    if len(isas) == 1 or args.isa_child:
        return epoch_section(data_root, args, isas[0] if not args.isa_child else args.isa_child)
    for isa in isas:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "MKL_ENABLE_INSTRUCTIONS": isa.upper()}
        cmd = [sys.executable, __file__, "--only", "epoch", "--isa-child", isa, "--data-root", data_root]
        out = subprocess.run(
            cmd + ["--epochs", str(args.epochs), "--user-runs", str(args.user_runs)],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = out.stdout.splitlines()
        print(
            "\n".join(line for line in lines if not line.startswith(("machine:", "\n")) and "targets met" not in line)
        )
        for line in lines:
            if line.startswith("  -> "):
                what, _, rest = line[5:].partition(": ratio ")
                ratio, target = float(rest.split()[0]), float(rest.split("<= ")[1].split(")")[0])
                results.append((what, ratio, target, "MET" in rest))


def epoch_section(data_root: str, args, isa: str) -> None:
    print(
        f"\n1. MNIST epoch (batch 128, Adam, dropout 0.2), {isa.upper()} "
        f"(torch reports {torch.backends.cpu.get_cpu_capability()})"
    )
    users = user_epochs(data_root, args.user_runs, "runs/benchmark")
    n_train = len(load_data(optcli_config(data_root, "data.val_fraction=0.1").data, torch.device("cpu")).train)
    strict, per_step = strict_limit(n_train)
    print(
        f"  as a user sees it (train --set train.epochs=2, metrics.csv seconds of epoch 2, {n_train:,} training "
        f"images + validation): median {statistics.median(users):.3f} s (each: {', '.join(f'{t:.3f}' for t in users)})"
    )
    print(
        f"  strict limit:     {strict:.3f} s = {math.ceil(n_train / BATCH)} steps x the 8 matmuls of one step, each "
        f"hot at its shape and layout (per step at batch 128: {sum(per_step.values()) * 1e6:.0f} us = "
        + ", ".join(f"{k} {v * 1e6:.0f}" for k, v in per_step.items())
        + ")"
    )
    check(f"user-visible epoch / strict limit ({isa})", statistics.median(users) / strict, 1.5)
    ours = time_optcli_epochs(data_root, args.epochs)
    print(
        f"  optcli epoch loop over all 60,000 images (no validation, in this process): median "
        f"{statistics.median(ours):.3f} s  (each: {', '.join(f'{t:.3f}' for t in ours)})"
    )
    canonical = time_canonical_epochs(data_root, max(2, args.epochs - 1))
    print(
        f"  canonical epoch:  median {statistics.median(canonical):.3f} s  "
        f"(each: {', '.join(f'{t:.3f}' for t in canonical)})"
    )
    limit, flops = compute_limit(60000)
    print(
        f"  compute limit of 60,000 images: {limit:.3f} s  ({flops / 1e9:.1f} GFLOP of matmuls at "
        f"{flops / limit / 1e9:.1f} GFLOP/s measured per shape with torch.matmul, operands contiguous)"
    )
    check(f"optcli / canonical epoch ({isa})", statistics.median(ours) / statistics.median(canonical), 0.30)
    check(f"optcli epoch / compute limit ({isa})", statistics.median(ours) / limit, 1.5)
    if args.compile:
        compiled = time_optcli_epochs(data_root, args.epochs, "train.compile=true")
        print(
            f"  with train.compile=true: median {statistics.median(compiled):.3f} s "
            f"({statistics.median(compiled) / statistics.median(ours):.2f}x the eager epoch)"
        )


def precision_section(data_root: str, args) -> None:
    print(f"\nMNIST epoch by train.precision (no target: bf16 is for GPUs; median of {args.epochs})")
    base = None
    for precision in ("32", "bf16"):
        times = time_optcli_epochs(data_root, args.epochs, f"train.precision={precision}")
        median = statistics.median(times)
        base = base or median
        print(
            f"  {precision:>4}: median {median:.3f} s  ({median / base:.2f}x float32; "
            f"each: {', '.join(f'{t:.3f}' for t in times)})"
        )


def cli_section() -> None:
    print("\n2. CLI start (median of 7)")
    for cmd in (["--help"], ["compare", "--help"]):
        t = statistics.median(cli_start_times(cmd))
        print(f"  optcli {' '.join(cmd)}: {t:.3f} s")
        check(f"optcli {' '.join(cmd)} seconds / 1 s", t, 0.3)


def compare_section(data_root: str, args, out_dir: str) -> None:
    print(f"\n3. compare sgd adam rmsprop, 3 seeds, {args.compare_epochs} epochs each (a fresh process)")
    serial = run_compare(data_root, args.compare_epochs, 1, out_dir)
    outside = serial["wall"] - serial["epoch_seconds"]
    print(
        f"  wall {serial['wall']:.1f} s, inside training epochs {serial['epoch_seconds']:.1f} s, "
        f"outside {outside:.1f} s "
        f"(data loaded once; includes the one-time imports of torchvision and torch._dynamo)"
    )
    check("compare time outside epochs / wall", outside / serial["wall"], 0.10)
    parallel = run_compare(data_root, args.compare_epochs, 2, out_dir)
    print(
        f"  --jobs 2 (1 thread each): wall {parallel['wall']:.1f} s, speed-up {serial['wall'] / parallel['wall']:.2f}x "
        f"over the serial run with {torch.get_num_threads()} threads"
    )
    # bit-identity needs equal thread counts: --jobs 2 (1 thread each) against a serial --threads 1, one epoch each
    parallel_1 = run_compare(data_root, 1, 2, out_dir)
    serial_1 = run_compare(data_root, 1, 1, out_dir, threads=1)
    same = serial_1["losses"] == parallel_1["losses"]
    print(f"  1 epoch each, --jobs 2 against serial --threads 1: per-epoch losses bit-identical: {same}")
    if not same:
        results.append(("--jobs 2 identical to serial --threads 1", 1.0, 0.0, False))


SPECS = ("sgd:lr=0.01,momentum=0.9", "adam", "rmsprop:lr=0.001")  # 3 elementwise optimizers


def largest_difference(a, b) -> tuple[float, float, str]:
    """The largest relative difference of any per-epoch metric (and the test metrics) between two comparisons: at
    the first epoch (float32 rounding, before training amplifies it) and overall, with where the overall one is."""
    first, worst, where = 0.0, 0.0, ""
    for ta, tb in zip(a.trials, b.trials, strict=True):
        pairs = [
            (i + 1, k, getattr(ea, k), getattr(eb, k))
            for i, (ea, eb) in enumerate(zip(ta.history.epochs, tb.history.epochs, strict=True))
            for k in ("train_loss", "val_loss", "val_accuracy")
        ]
        pairs += [("test", "test_loss", ta.history.test_loss, tb.history.test_loss)]
        pairs += [("test", "test_accuracy", ta.history.test_accuracy, tb.history.test_accuracy)]
        for epoch, key, x, y in pairs:
            if x is None or y is None or x == y:
                continue
            d = abs(x - y) / max(abs(x), abs(y))
            if epoch == 1:
                first = max(first, d)
            if d > worst:
                worst, where = d, f"{ta.label} seed {ta.seed} epoch {epoch} {key} {x:.4g} against {y:.4g}"
    return first, worst, where


STACK_EPOCHS = 200  # the measure: compare sgd adam rmsprop --seeds 5 --epochs 200 on the default task
STACK_REPEATS = 3  # interleaved; medians quoted


def training_seconds(comparison) -> float:
    """The sum over trials of each trial's train_seconds: training time, start-up and evaluation excluded."""
    return sum(t.history.epochs[-1].train_seconds for t in comparison.trials if t.history.epochs)


def as_user_model(cfg):
    """The same MLP named as a user's model (optcli.engine.model:MLP), so --vectorize stacks it through torch.func."""
    model = cfg.model.model_copy(update={"name": "optcli.engine.model:MLP", "kwargs": {"hidden": cfg.model.hidden}})
    return cfg.model_copy(update={"model": model})


def vectorized_section(data_root: str, args, out_dir: str) -> None:
    from optcli.compare.comparison import run_comparison
    from optcli.compare.options import CompareOptions

    print(
        "\n5. 3 optimizers x 5 seeds, the seeds stacked (--vectorize) against the plain path: training time (the sum "
        f"of the trials' train_seconds), median of {STACK_REPEATS} interleaved runs, 1 thread each, load average "
        f"{os.getloadavg()[0]:.1f} at the start"
    )
    warm_up = load_config(None, ["train.epochs=2", f"out_dir={out_dir}"])
    run_comparison(warm_up, ["adam"], CompareOptions(seeds=2))
    mnist = [
        f"data.root={data_root}",
        "data.download=false",
        "model.hidden=[128]",
        f"train.epochs={args.compare_epochs}",
    ]
    tasks = [
        (f"regression (default task), {STACK_EPOCHS} epochs", None, [f"train.epochs={STACK_EPOCHS}"], 4.0),
        (f"MNIST, model.hidden=[128], {args.compare_epochs} epochs", ROOT / "configs" / "mnist_mlp.yaml", mnist, 1.5),
    ]
    for name, config, extra, target in tasks:
        cfg = load_config(config, [*extra, f"out_dir={out_dir}", "device=cpu"])
        # torch.func on the same MLP as a user's model, where it stacks (not with dropout: vmap_refusal)
        modes = {"plain": (cfg, False), "stacked": (cfg, True)}
        if cfg.model.dropout == 0:
            modes["torch.func"] = (as_user_model(cfg), True)
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        runs = {}
        for _ in range(STACK_REPEATS):
            for mode, (mode_cfg, vectorize) in modes.items():
                runs[mode] = run_comparison(
                    mode_cfg, list(SPECS), CompareOptions(seeds=5, threads=1, vectorize=vectorize)
                )
                seconds[mode].append(training_seconds(runs[mode]))
        median = {mode: statistics.median(v) for mode, v in seconds.items()}
        first, worst, where = largest_difference(runs["plain"], runs["stacked"])
        figures = ", ".join(f"{mode} {t:.2f} s ({median['plain'] / t:.2f}x)" for mode, t in median.items())
        print(
            f"  {name}: training time {figures}; every run: "
            + "; ".join(f"{mode} {' '.join(f'{t:.2f}' for t in v)}" for mode, v in seconds.items())
            + f"; load average now {os.getloadavg()[0]:.1f}"
        )
        print(
            f"  largest relative difference of a per-epoch metric, stacked against plain: {first:.2e} at epoch 1, "
            f"{worst:.2e} overall ({where})" + "".join(f"; {note}" for note in runs["stacked"].notes)
        )
        check(
            f"stacked / plain training time, {name} (speed-up >= {target}x)",
            median["stacked"] / median["plain"],
            1 / target,
        )


def backend_section(data_root: str, args, out_dir: str) -> None:
    print(
        f"\n6. the 3 x 5 regression comparison (default task, {args.regression_epochs} epochs; a fresh process each, "
        "wall time of run_comparison)"
    )
    walls = {}
    for what, jobs, backend in (("serial", 1, "local"), ("--jobs 2", 2, "local"), ("--backend ray", 1, "ray")):
        r = run_compare(
            data_root, args.regression_epochs, jobs, out_dir, config=None, specs=SPECS, seeds=5, backend=backend
        )
        walls[what] = r["wall"]
        extra = (
            " (local Ray instance of this machine's 2 CPUs, 1 CPU per trial, started inside)"
            if backend == "ray"
            else ""
        )
        print(f"  {what}: wall {r['wall']:.1f} s, {walls['serial'] / r['wall']:.2f}x the serial speed{extra}")


def startup_section(out_dir: str) -> None:
    print("\n7. What `optcli train` (the default task) costs before it trains (median of 3 fresh processes)")
    probes = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("import torch", [sys.executable, "-c", "import torch"]),
        ("import torch, torch._dynamo", [sys.executable, "-c", "import torch, torch._dynamo"]),
    ]
    for what, cmd in probes:
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            t.append(time.perf_counter() - t0)
        print(f"  {what}: {statistics.median(t):.2f} s")
    walls, trains, firsts, warms = [], [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "optcli", "train", "--json", "--set", f"out_dir={out_dir}"],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        walls.append(time.perf_counter() - t0)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        run_dir = Path(summary["run_dir"])
        seconds = epoch_seconds(ROOT / run_dir)
        trains.append(sum(seconds))  # every epoch's own time, from metrics.csv
        firsts.append(seconds[0])
        warms.append(summary["seconds_per_epoch_median_warm"])
    wall, train = statistics.median(walls), statistics.median(trains)
    first, warm = statistics.median(firsts), statistics.median(warms)
    print(
        f"  optcli train: wall {wall:.2f} s, of which training epochs {train:.2f} s, before/after training "
        f"{wall - train:.2f} s; the first epoch {first:.3f} s, the later ones {warm:.3f} s each (median), so "
        f"{first - warm:.3f} s of the first is warm-up"
    )


# Runs the CLI in this fresh process with the time of each kind of work taken exclusively (time spent in a nested
# timed call counts for the inner kind only): imports (every module load, wherever it happens), data (load_data),
# training (fit, the epochs with their validation), writing (atomic file writes, checkpoints, plots, report.html).
WAIT_SNIPPET = r"""
import json, os, sys, threading, time
T0 = time.perf_counter()
import _frozen_importlib

MAIN, totals, stack = threading.get_ident(), {}, []

def timed(kind, fn):
    def wrapper(*args, **kwargs):
        if threading.get_ident() != MAIN:
            return fn(*args, **kwargs)
        frame = [kind, time.perf_counter(), 0.0]
        stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            elapsed = time.perf_counter() - frame[1]
            totals[kind] = totals.get(kind, 0.0) + elapsed - frame[2]
            if stack:
                stack[-1][2] += elapsed
            if kind == "imports" and any(f[0] == "training" for f in stack):
                totals["imports during training"] = totals.get("imports during training", 0.0) + elapsed - frame[2]
    return wrapper

_frozen_importlib._find_and_load = timed("imports", _frozen_importlib._find_and_load)
import optcli.cli, optcli.compare.comparison, optcli.compare.runners, optcli.engine.loop, optcli.report.html
import optcli.report.plots, optcli.rundir.files, optcli.rundir.run, optcli.tasks

targets = {
    "data": [(optcli.tasks, "load_data")],
    "training": [(optcli.engine.loop, "fit")],
    "writing": [(optcli.rundir.files, n) for n in ("atomic_write_bytes", "atomic_write_files", "atomic_write_text",
                                                   "save_checkpoint")]
    + [(optcli.report.plots, "save_figure"), (optcli.report.html, "build_report"), (optcli.report.html,
                                                                                   "report_after_run")],
}
for kind, where in targets.items():
    for module, name in where:
        original = getattr(module, name)
        wrapped = timed(kind, original)
        for m in list(sys.modules.values()):  # every `from x import name` binding too
            if getattr(m, "__name__", "").startswith("optcli") and getattr(m, name, None) is original:
                setattr(m, name, wrapped)
try:
    optcli.cli.app(sys.argv[1:], prog_name="optcli", standalone_mode=False)
finally:
    totals["inside"] = time.perf_counter() - T0
    with open(os.environ["OPTCLI_WAIT_OUT"], "w") as f:
        json.dump(totals, f)
"""


def waited(args: list[str], out_dir: str) -> dict:
    """One CLI command in a fresh process: its wall time from outside and the exclusive times from WAIT_SNIPPET."""
    result = ROOT / out_dir / "wait.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPTCLI_WAIT_OUT": str(result)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", WAIT_SNIPPET, *args], check=True, capture_output=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    return {**json.loads(result.read_text()), "wall": wall}


def epoch_seconds(run_dir: Path) -> list[float]:
    return [float(row["seconds"]) for row in csv.DictReader((run_dir / "metrics.csv").open())]


def wait_section(data_root: str, args, out_dir: str) -> None:
    """What a user waits for: the first epoch against the later ones, and where a command's wall time goes."""
    start = [sys.executable, "-c", "pass"]
    python = statistics.median(_wall(start) for _ in range(3))
    mnist = ["-c", str(ROOT / "configs" / "mnist_mlp.yaml"), "--set", f"data.root={data_root}"]
    mnist += ["--set", "data.download=false", "--set", "device=cpu", "--set", f"out_dir={out_dir}"]
    epochs = max(3, args.epochs + 1)
    commands = [
        (
            f"optcli train -c configs/mnist_mlp.yaml, {epochs} epochs",
            ["train", *mnist, "--set", f"train.epochs={epochs}", "--set", "name=wait-train"],
        ),
        (
            f"optcli compare sgd adam rmsprop --seeds 2 (default task, {args.compare_epochs} epochs)",
            ["compare", "sgd", "adam", "rmsprop", "--seeds", "2", "--epochs", str(args.compare_epochs)]
            + ["--set", f"out_dir={out_dir}", "--set", "name=wait-compare"],
        ),
    ]
    print(f"\n8. What a user waits for (a fresh process each; python itself starts in {python:.2f} s)")
    for what, cmd in commands:
        shutil.rmtree(ROOT / out_dir, ignore_errors=True)
        t = waited(cmd, out_dir)
        parts = {k: t.get(k, 0.0) for k in ("imports", "data", "training", "writing")}
        rest = t["wall"] - python - sum(parts.values())
        print(
            f"  {what}: wall {t['wall']:.2f} s = python start {python:.2f} + "
            + " + ".join(f"{k} {v:.2f}" for k, v in parts.items())
            + f" + the rest {rest:.2f} s (parsing, building the model and optimizer, printing, process exit)"
        )
        if cmd[0] == "train":
            seconds = epoch_seconds(ROOT / out_dir / "wait-train")
            later = statistics.median(seconds[1:])
            print(
                f"  first epoch {seconds[0]:.3f} s against the median of the later ones {later:.3f} s "
                f"({seconds[0] / later:.2f}x; imports during training {t.get('imports during training', 0.0):.3f} s)"
            )
    shutil.rmtree(ROOT / out_dir, ignore_errors=True)


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def memory_section(data_root: str, out_dir: str) -> None:
    print("\n4. Peak memory of `optcli train -c configs/mnist_mlp.yaml` (1 epoch)")
    rss = peak_rss_mb(data_root, out_dir)
    print(f"  peak RSS {rss:.0f} MB")
    check("peak RSS / 1500 MB", rss / 1500, 1.0)
    shutil.rmtree(ROOT / out_dir, ignore_errors=True)


def stream_section(data_root: str) -> None:
    """Issue 23: a user's Dataset (MNIST one sample per __getitem__, benchmarks/mnist_dataset.py) held in memory as
    tensors against streamed through a DataLoader with num_workers 0 and 2: the one pass that loads it, then one
    training epoch (after a warm-up) of the same batches, hidden [128], batch 128, Adam. On one torch thread: on a
    2-core machine shared with other jobs, two threads contending with them made every step many times slower."""
    print("\nstreamed Dataset against in memory (MNIST through a Dataset, hidden [128], batch 128, 1 epoch each,")
    print("1 torch thread)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = ["data.name=mnist_dataset:make_dataset", f"data.path={ROOT / 'benchmarks'}", "model.hidden=[128]"]
    base.append(f"data.kwargs={{root: {data_root}}}")
    timed = {}
    for label, extra in (
        ("in memory", ["data.stream=false"]),
        ("streamed, num_workers 0", ["data.stream=true", "data.num_workers=0"]),
        ("streamed, num_workers 2", ["data.stream=true", "data.num_workers=2"]),
    ):
        t0 = time.perf_counter()
        cfg = optcli_config(data_root, *base, *extra)  # validating it asks the task its kind: one pass over the data
        load = time.perf_counter() - t0
        with torch_settings(cfg):
            timed[label] = statistics.median(_time_epochs(cfg, 1))
        ratio = timed[label] / timed["in memory"]
        print(f"  {label:<24} load {load:6.2f} s   epoch {timed[label]:6.2f} s   {ratio:5.2f}x the in-memory epoch")
    torch.set_num_threads(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (after one warm-up)")
    parser.add_argument("--compare-epochs", type=int, default=3, help="epochs per trial in the compare measurement")
    parser.add_argument(
        "--regression-epochs", type=int, default=500, help="epochs per trial of the 3 x 5 regression comparisons"
    )
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    parser.add_argument("--user-runs", type=int, default=3, help="fresh `optcli train` runs timing the user's epoch")
    parser.add_argument(
        "--only",
        choices=[
            "epoch",
            "precision",
            "cli",
            "compare",
            "memory",
            "vectorize",
            "backends",
            "startup",
            "wait",
            "stream",
        ],
        action="append",
        help="run only these sections (repeatable); all by default",
    )
    parser.add_argument("--isa-child", help=argparse.SUPPRESS)  # the epoch section for one instruction set
    args = parser.parse_args()
    data_root = str(Path(args.data_root).resolve())
    if not (Path(data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        print(f"MNIST not found under {data_root}/MNIST/raw; pass --data-root", file=sys.stderr)
        return 2
    out_dir = "runs/benchmark"  # inside the repository (runs/ is ignored by git); removed at the end
    print(f"machine: {machine()}")

    run = lambda section: not args.only or section in args.only  # noqa: E731
    if run("epoch"):
        epoch_sections(data_root, args)
    if run("precision"):
        precision_section(data_root, args)
    if run("cli"):
        cli_section()
    if run("compare"):
        compare_section(data_root, args, out_dir)
    if run("vectorize"):
        vectorized_section(data_root, args, out_dir)
    if run("backends"):
        backend_section(data_root, args, out_dir)
    if run("startup"):
        startup_section(out_dir)
    if run("wait"):
        wait_section(data_root, args, out_dir)
    if run("memory"):
        memory_section(data_root, out_dir)
    if run("stream"):
        stream_section(data_root)
    missed = [r for r in results if not r[3]]
    print(
        f"\n{len(results) - len(missed)} of {len(results)} targets met"
        + (": missed " + "; ".join(r[0] for r in missed) if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
