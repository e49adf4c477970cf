"""How numbers are written for a reader: significant digits, percentages, mean ± std, sparklines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def mean_pm(mean: float | None, std: float | None, as_pct: bool = False) -> str:
    if mean is None:
        return "—"
    if as_pct:
        return pct(mean) + (f" ± {100 * std:.2f}" if std is not None else "")
    return fmt(mean) + (f" ± {std:.2g}" if std is not None else "")


def nbytes(value: float | None) -> str:
    """Bytes in binary units: 0 B, 512 B, 2.6 MiB."""
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024 or unit == "MiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 40) -> str:
    """Loss curves span orders of magnitude, so the line is drawn on a log scale."""
    pts = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not pts:
        return "—"
    step = max(1, math.ceil(len(values) / width))
    sampled = [values[i] for i in range(0, len(values), step)]
    lo, hi = math.log10(min(pts)), math.log10(max(pts))
    span = hi - lo or 1.0
    return "".join(
        " "
        if v is None or v <= 0 or not math.isfinite(v)
        else SPARKS[min(len(SPARKS) - 1, int((math.log10(v) - lo) / span * len(SPARKS)))]
        for v in sampled
    )
