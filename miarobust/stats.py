"""Statistics of per-sample results: pure functions, no I/O."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a proportion; `successes` may be fractional (mean of draws)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def normal_sf(z: float) -> float:
    """Survival function of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_proportion_drop_p(base_successes: float, base_n: int, new_successes: float, new_n: int) -> float:
    """One-sided p-value that the new proportion is lower than the base (pooled two-proportion z-test)."""
    if base_n <= 0 or new_n <= 0:
        return 1.0
    p1, p2 = base_successes / base_n, new_successes / new_n
    pooled = (base_successes + new_successes) / (base_n + new_n)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / base_n + 1 / new_n), 1e-12))
    return normal_sf((p1 - p2) / se)


def paired_drop_p(only_base: int, only_new: int) -> float:
    """One-sided exact McNemar p-value that the new run is worse, from the discordant pairs of the same samples.

    only_base: samples correct in the base run only; only_new: correct in the new run only.
    """
    n = only_base + only_new
    if n == 0:
        return 1.0
    # P(X >= only_base) for X ~ Binomial(n, 1/2)
    return sum(math.comb(n, k) for k in range(only_base, n + 1)) / 2**n


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value that two runs on the same samples differ, from their discordant pairs
    (only_a: samples correct in run a only; only_b: in run b only): twice the smaller one-sided p, at most 1."""
    return min(1.0, 2 * min(paired_drop_p(only_a, only_b), paired_drop_p(only_b, only_a)))


def paired_mean_diff(a: list[float], b: list[float], z: float = Z95) -> tuple[float, float, float, float]:
    """Mean of a - b over paired samples, its 95% interval and the two-sided p-value that it is 0 (normal
    approximation of the paired t-test). For per-sample outcomes in [0, 1] that need not be 0/1, such as a
    stochastic model's probability of a correct answer over gate draws, where McNemar's test does not apply.
    """
    n = len(a)
    if n != len(b):
        raise ValueError(f"paired samples of different lengths: {n} and {len(b)}")
    if n < 2:
        return (a[0] - b[0] if n else 0.0, -1.0, 1.0, 1.0)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
    if se == 0:
        return (mean, mean, mean, 1.0 if mean == 0 else 0.0)
    return (mean, mean - z * se, mean + z * se, min(1.0, 2 * normal_sf(abs(mean) / se)))


def mcnemar_power(m: int, rate: float = 0.05, level: float = 0.05) -> float:
    """Power of the one-sided exact McNemar test (`paired_drop_p`) at `level` over m paired samples, when each
    sample is discordant against the new run with probability `rate` and none is discordant the other way.

    Then the discordant count b ~ Binomial(m, rate) and the p-value is 0.5**b, so the test flags when b >= b_min,
    the smallest count with 0.5**b_min <= level: the power is P(Binomial(m, rate) >= b_min).
    """
    if m <= 0 or not 0 < level < 1:
        return 0.0
    b_min = 0
    while 0.5**b_min > level:
        b_min += 1
    return min(1.0, float(sum(math.comb(m, k) * rate**k * (1 - rate) ** (m - k) for k in range(b_min, m + 1))))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the order given: the i-th smallest of m p-values
    (i from 0) times m - i, made monotone by a running maximum (step-down) and capped at 1. Rejecting where
    the adjusted value is below `level` controls the family-wise error rate at `level`."""
    for p in pvalues:
        if not 0.0 <= p <= 1.0:  # also refuses nan
            raise ValueError(f"p-value {p} is not in [0, 1]")
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
