"""Performance profiles (Dolan and Moré 2002), as AlgoPerf scores optimizers over workloads.

For each task t and optimizer o a measure m(t, o) > 0, lower is better, infinite where o failed (never reached
the target, or diverged). The ratio r(t, o) = m(t, o) / min over o of m(t, o) is 1 for the task's best; the
profile rho_o(tau) is the fraction of tasks on which r(t, o) <= tau: rho_o(1) is how often o was the best, and
rho_o(tau) for large tau how often it got there at all.
"""

from __future__ import annotations

import math

TAUS = [1.0, 1.1, 1.25, 1.5, 2.0, 4.0]


def ratios(measures: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """task -> optimizer -> measure / the task's best measure (inf where the measure is inf or every one is)."""
    out = {}
    for task, by_opt in measures.items():
        best = min(by_opt.values(), default=math.inf)
        out[task] = {
            o: (
                m / best
                if math.isfinite(m) and math.isfinite(best) and best > 0
                else (1.0 if m == best == 0 else math.inf)
            )
            for o, m in by_opt.items()
        }
    return out


def profile(measures: dict[str, dict[str, float]], taus: list[float] | None = None) -> dict[str, list[float]]:
    """optimizer -> [rho(tau) for tau in taus]."""
    taus = taus or TAUS
    r = ratios(measures)
    optimizers = list(dict.fromkeys(o for by_opt in measures.values() for o in by_opt))
    n = len(measures)
    return {o: [sum(1 for t in r if r[t].get(o, math.inf) <= tau) / n for tau in taus] for o in optimizers}


def curve(measures: dict[str, dict[str, float]]) -> tuple[list[float], dict[str, list[float]]]:
    """The whole step function: the taus where some rho jumps (every finite ratio), and rho at each."""
    r = ratios(measures)
    taus = sorted({1.0} | {v for by_opt in r.values() for v in by_opt.values() if math.isfinite(v)})
    return taus, profile(measures, taus)
