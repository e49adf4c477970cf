"""Per-epoch losses of every built-in task, pinned as they were before the Task interface and the one training loop
(taken on a 2-core AVX2 EPYC, torch 2.14.1): a refactor that changes the data, the split, the initial weights, the
batch order or the loss of a built-in task changes these numbers by far more than the tolerance.

Tolerance: float32 has a unit roundoff of 6e-8; a matmul kernel of another instruction set (AVX-512 against AVX2)
sums in another order, which moves a dot product of length n by at most about n * 6e-8 relative (784 * 6e-8 = 5e-5
for MNIST's first layer), and a few dozen optimizer steps carry such differences forward without amplifying them by
more than a small factor on these smooth, non-diverging runs. rel=1e-3 leaves a wide margin for that, while a change
of initial weights, batches or split moves these losses by percent or more."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import cli, mnist_args, write_tiny_mnist

PINNED = {
    "regression": [(1.267246856689453, 1.3224600219726563), (1.0510797882080078, 1.093343276977539),
                   (0.8821793365478515, 0.90235107421875)],
    "tutorial": [(9.677084922790527, None), (9.422467231750488, None), (9.176928520202637, None)],
    "function": [(8.038003921508789, None), (7.0433349609375, None), (6.32894229888916, None)],
    "mnist": [(1.6921769460042317, 0.6085777282714844), (0.33338963190714516, 0.04248656034469604),
              (0.008828536669413248, 0.0003739551951487859)],
}  # fmt: skip


def _args(task: str, repo_root, tmp_path) -> list:
    if task == "tutorial":
        return ["-c", repo_root / "configs" / "tutorial.yaml"]
    if task == "function":
        return ["-c", repo_root / "configs" / "rosenbrock.yaml", "--set", "optimizer.lr=0.01"]
    if task == "mnist":
        return mnist_args(write_tiny_mnist(tmp_path / "mn"))
    return []


@pytest.mark.parametrize("task", sorted(PINNED))
def test_built_in_tasks_train_to_their_pinned_losses(task, repo_root, tmp_path):
    result = cli("train", *_args(task, repo_root, tmp_path), "--set", "train.epochs=3", "--set", f"name={task}")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "runs" / task / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    got = [(float(r["train_loss"]), float(r["val_loss"]) if r["val_loss"] else None) for r in rows]
    assert len(got) == len(PINNED[task])
    for (train, val), (want_train, want_val) in zip(got, PINNED[task], strict=True):
        assert train == pytest.approx(want_train, rel=1e-3)
        assert (val is None) == (want_val is None)
        if val is not None:
            assert val == pytest.approx(want_val, rel=1e-3)
