"""Where a result came from: the software versions and the machine settings that decide its last bits."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def provenance(*, device: Any, threads: int, jobs: int = 1, optimizer_classes: Sequence[type] = ()) -> dict[str, Any]:
    """optcli, Python and torch versions, the versions of the packages the optimizers come from (other than
    torch), the CPU instruction set torch's kernels dispatched to, torch threads per run, processes, device."""
    packages = sorted({cls.__module__.split(".")[0] for cls in optimizer_classes} - {"torch"})
    return {
        "optcli": _version("optcli"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optimizer_packages": {p: getattr(sys.modules.get(p), "__version__", None) or _version(p) for p in packages},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "jobs": jobs,
        "device": str(device),
    }


def differences(parts: list[dict]) -> list[str]:
    """The provenance keys on which parts disagree, as 'key (a vs b)' strings."""
    keys = sorted({k for p in parts for k in p})
    out = []
    for key in keys:
        values = [p.get(key) for p in parts]
        if any(v != values[0] for v in values):
            distinct = list(dict.fromkeys(str(v) for v in values))
            out.append(f"{key} ({' vs '.join(distinct)})")
    return out
