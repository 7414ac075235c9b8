"""Report maths: accuracy with a bootstrap interval, and McNemar's exact test on paired outcomes.

Example:
    >>> mcnemar_exact(b=1, c=6).p_value  # 7 discordant pairs, 1 vs 6: two-sided binomial p
    0.125
    >>> lo, hi = bootstrap_ci([True] * 8 + [False] * 2, seed=0)
    >>> 0.5 <= lo <= 0.8 <= hi <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

__all__ = ["McNemar", "accuracy", "bootstrap_ci", "mcnemar_exact", "paired"]


def accuracy(outcomes: Sequence[bool]) -> float:
    """Share of True outcomes (0.0 for none)."""
    return float(np.mean(outcomes)) if len(outcomes) else 0.0


def bootstrap_ci(outcomes: Sequence[bool], *, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes.

    Draws `resamples` samples of the same size with replacement and returns the
    `(1 - level) / 2` and `(1 + level) / 2` quantiles of their means.
    """
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test: `b` items only A got right, `c` only B got right."""

    b: int
    c: int
    p_value: float


def mcnemar_exact(b: int, c: int) -> McNemar:
    """Two-sided exact McNemar test: a binomial test of `b` successes in `b + c` trials at p = 0.5."""
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0)
    k = min(b, c)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
    return McNemar(b, c, min(1.0, 2 * tail))


def paired(a: dict[str, bool], b: dict[str, bool]) -> McNemar:
    """McNemar's test of two methods on the items both answered (dicts id -> correct)."""
    common = a.keys() & b.keys()
    only_a = sum(1 for i in common if a[i] and not b[i])
    only_b = sum(1 for i in common if b[i] and not a[i])
    return mcnemar_exact(only_a, only_b)
