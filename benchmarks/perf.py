"""optcli performance benchmark: prints each figure, its ratio and its target; exits 1 when a target is missed.

Promises checked (all as ratios measured in this one run, on this machine, never as absolute times):
  1. An MNIST epoch of configs/mnist_mlp.yaml (784-512-512-10, batch 128, Adam, dropout 0.2) takes
     a) at most 0.30 of the canonical loop's time (torchvision MNIST + ToTensor/Normalize + DataLoader(shuffle=True),
        the same model written plainly, torch.optim.Adam with its defaults), and
     b) at most 1.5x the compute limit: the epoch's forward and backward matmul FLOPs divided by the FLOP/s that
        torch.matmul reaches here for those same shapes.
  2. `optcli --help` and `optcli compare --help` start in at most 0.3 s (median of several starts).
  3. `compare` of 3 optimizers x 3 seeds spends at most 10% of its wall time outside the training epochs.
  4. An MNIST training peaks at most 1.5 GB resident.
It also reports the speed-up of `compare --jobs 2` over the serial run (no target).

Both loops train on all 60,000 training images (val_fraction 0), after one warm-up epoch; times are medians.
Run from the repository root:  python benchmarks/perf.py [--data-root ../shared/data] [--epochs 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
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

from optcli.build import build_model_and_optimizer, torch_settings  # noqa: E402
from optcli.config import load_config  # noqa: E402
from optcli.tasks import epoch_permutation, load_data  # noqa: E402
from optcli.train import make_loss, train_one_epoch  # noqa: E402

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
        losses = train_one_epoch(
            run_model,
            optimizer,
            loss_fn,
            data.train,
            batch_size=BATCH,
            perm=epoch_permutation(len(data.train), 0, epoch, device),
        )
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


def compute_limit(n: int) -> tuple[float, float]:
    """(seconds, FLOPs) of the epoch's matmuls at the rate torch.matmul reaches for each shape here."""
    seconds = flops = 0.0
    for (m, k, p), count in matmul_shapes(n):
        a, b = torch.randn(m, k), torch.randn(k, p)
        for _ in range(20):
            torch.matmul(a, b)
        reps, samples = max(20, int(2e9 / (2 * m * k * p))), []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            samples.append((time.perf_counter() - t0) / reps)
        per_call = statistics.median(samples)
        seconds += per_call * count
        flops += 2.0 * m * k * p * count
    return seconds, flops


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
from optcli.compare import run_comparison
cfg = load_config(sys.argv[1], sys.argv[4:])
t0 = time.perf_counter()
c = run_comparison(cfg, ["sgd", "adam", "rmsprop"], seeds=3, jobs=int(sys.argv[2]), threads=int(sys.argv[3]) or None)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "epoch_seconds": c.epoch_seconds, "jobs": c.jobs, "run_dir": c.run_dir,
                  "losses": [[e.train_loss for e in t.history.epochs] for t in c.trials]}))
"""


def run_compare(data_root: str, epochs: int, jobs: int, out_dir: str, threads: int = 0) -> dict:
    overrides = [
        f"data.root={data_root}",
        "data.download=false",
        f"train.epochs={epochs}",
        f"out_dir={out_dir}",
        "device=cpu",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            COMPARE_SNIPPET,
            str(ROOT / "configs" / "mnist_mlp.yaml"),
            str(jobs),
            str(threads),
            *overrides,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
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


def epoch_section(data_root: str, args) -> None:
    print("\n1. MNIST epoch (60,000 images, batch 128, Adam, dropout 0.2)")
    ours = time_optcli_epochs(data_root, args.epochs)
    print(f"  optcli epoch:     median {statistics.median(ours):.3f} s  (each: {', '.join(f'{t:.3f}' for t in ours)})")
    canonical = time_canonical_epochs(data_root, max(2, args.epochs - 1))
    print(
        f"  canonical epoch:  median {statistics.median(canonical):.3f} s  "
        f"(each: {', '.join(f'{t:.3f}' for t in canonical)})"
    )
    limit, flops = compute_limit(60000)
    print(
        f"  compute limit:    {limit:.3f} s  ({flops / 1e9:.1f} GFLOP of matmuls at {flops / limit / 1e9:.1f} GFLOP/s "
        f"measured per shape with torch.matmul)"
    )
    check("optcli / canonical epoch", statistics.median(ours) / statistics.median(canonical), 0.30)
    check("optcli epoch / compute limit", statistics.median(ours) / limit, 1.5)
    if args.compile:
        compiled = time_optcli_epochs(data_root, args.epochs, "train.compile=true")
        print(
            f"  with train.compile=true: median {statistics.median(compiled):.3f} s "
            f"({statistics.median(compiled) / statistics.median(ours):.2f}x the eager epoch)"
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


def memory_section(data_root: str, out_dir: str) -> None:
    print("\n4. Peak memory of `optcli train -c configs/mnist_mlp.yaml` (1 epoch)")
    rss = peak_rss_mb(data_root, out_dir)
    print(f"  peak RSS {rss:.0f} MB")
    check("peak RSS / 1500 MB", rss / 1500, 1.0)
    shutil.rmtree(ROOT / out_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (after one warm-up)")
    parser.add_argument("--compare-epochs", type=int, default=3, help="epochs per trial in the compare measurement")
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    parser.add_argument(
        "--only",
        choices=["epoch", "cli", "compare", "memory"],
        action="append",
        help="run only these sections (repeatable); all by default",
    )
    args = parser.parse_args()
    data_root = str(Path(args.data_root).resolve())
    if not (Path(data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        print(f"MNIST not found under {data_root}/MNIST/raw; pass --data-root", file=sys.stderr)
        return 2
    out_dir = "runs/benchmark"  # inside the repository (runs/ is ignored by git); removed at the end
    print(f"machine: {machine()}")

    run = lambda section: not args.only or section in args.only  # noqa: E731
    if run("epoch"):
        epoch_section(data_root, args)
    if run("cli"):
        cli_section()
    if run("compare"):
        compare_section(data_root, args, out_dir)
    if run("memory"):
        memory_section(data_root, out_dir)
    missed = [r for r in results if not r[3]]
    print(
        f"\n{len(results) - len(missed)} of {len(results)} targets met"
        + (": missed " + "; ".join(r[0] for r in missed) if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
