"""Uncertainty for the evaluation's numbers: confidence intervals and paired tests, in plain Python.

- :func:`wilson` — the Wilson score interval of a proportion (a task's accuracy: every value 0 or 1). Unlike
  mean +- 1.96 stderr it stays inside [0, 1] and is not zero-width at 0 % or 100 %.
- :func:`bootstrap_mean` — a percentile bootstrap interval of a mean of other values (token recall, F1,
  CLIP similarity), 2000 resamples from a ``random.Random`` seeded by the caller, so a rerun is identical.
- :func:`interval` picks between the two: Wilson when every value is 0 or 1, the bootstrap otherwise.
- :func:`mcnemar_exact` — the exact (binomial) McNemar test of two paired correct/incorrect lists: two-sided
  p = min(1, 2 * P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2), ``b`` and ``c`` the discordant pairs.
- :func:`paired_bootstrap` — the mean paired difference of two score lists, its bootstrap interval and a
  two-sided bootstrap p-value (twice the smaller share of resampled differences on either side of 0).

No numpy or scipy here (the library stays light); tests check these against scipy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the normal quantile of 0.975
N_BOOTSTRAP = 2000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (lower, upper) of ``successes`` out of ``n``; None for n 0."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, whatever the rounding
    return low, 1.0 if successes == n else min(1.0, centre + half)


def _percentiles(values: list[float], alpha: float = 0.05) -> tuple[float, float]:
    values = sorted(values)
    k = len(values) - 1
    lo, hi = alpha / 2 * k, (1 - alpha / 2) * k
    return _at(values, lo), _at(values, hi)


def _at(values: list[float], pos: float) -> float:
    i = int(math.floor(pos))
    j = min(i + 1, len(values) - 1)
    return values[i] + (values[j] - values[i]) * (pos - i)


def bootstrap_mean(values: Sequence[float], seed: int | str = 0, n_resamples: int = N_BOOTSTRAP) -> tuple[float, float] | None:
    """A 95 % percentile bootstrap interval of the mean; None for no values, the value itself for one."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return None
    if n == 1:
        return vals[0], vals[0]
    rng = random.Random(f"bootstrap:{seed}")
    means = [sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples)]
    return _percentiles(means)


def is_binary(values: Sequence[float]) -> bool:
    return all(float(v) in (0.0, 1.0) for v in values)


def interval(values: Sequence[float], seed: int | str = 0) -> dict | None:
    """``{"low", "high", "method"}``: Wilson for 0/1 values, the seeded bootstrap otherwise; None for none."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    if is_binary(vals):
        low, high = wilson(int(sum(vals)), len(vals))
        return {"low": low, "high": high, "method": "wilson"}
    low, high = bootstrap_mean(vals, seed)
    return {"low": low, "high": high, "method": "bootstrap"}


def binom_cdf_half(k: int, n: int) -> float:
    """P[X <= k] for X ~ Binomial(n, 1/2), exactly (integer sums, one division)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """The exact McNemar test of paired outcomes: ``{"b": first right and second wrong, "c": the reverse,
    "p_value"}`` (p 1.0 when no pair disagrees)."""
    if len(first) != len(second):
        raise ValueError(f"paired lists differ in length ({len(first)} and {len(second)})")
    b = sum(bool(x) and not bool(y) for x, y in zip(first, second))
    c = sum(bool(y) and not bool(x) for x, y in zip(first, second))
    p = 1.0 if b + c == 0 else min(1.0, 2 * binom_cdf_half(min(b, c), b + c))
    return {"b": b, "c": c, "p_value": p}


def paired_bootstrap(first: Sequence[float], second: Sequence[float], seed: int | str = 0,
                     n_resamples: int = N_BOOTSTRAP) -> dict:
    """``{"difference": mean(second - first), "low", "high", "p_value"}`` by resampling the pairs."""
    if len(first) != len(second):
        raise ValueError(f"paired lists differ in length ({len(first)} and {len(second)})")
    diffs = [float(y) - float(x) for x, y in zip(first, second)]
    n = len(diffs)
    if n == 0:
        return {"difference": None, "low": None, "high": None, "p_value": None}
    rng = random.Random(f"paired:{seed}")
    means = [sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples)]
    low, high = _percentiles(means)
    below = sum(m <= 0 for m in means) / n_resamples
    above = sum(m >= 0 for m in means) / n_resamples
    return {"difference": sum(diffs) / n, "low": low, "high": high, "p_value": min(1.0, 2 * min(below, above))}


def summary(values, seed: int | str = 0) -> dict:
    """A metric's results.json entry: ``n``, ``score`` (the mean), ``stderr`` and ``ci95`` (:func:`interval`)."""
    from .scoring import mean_stderr

    vals = [float(v) for v in values]
    return {**mean_stderr(vals).as_dict(), "ci95": interval(vals, seed)}
