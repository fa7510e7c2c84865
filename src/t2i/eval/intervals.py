"""95% confidence intervals for the figures the reports and the claims page publish.

- `wilson`: an accuracy of k right out of n (Wilson 1927 score interval; unlike the normal approximation it
  stays inside [0, 1] and is usable at 0 or n successes and at small n).
- `bootstrap`: any statistic of a sample (e.g. the Fréchet distance of generated features to the reference
  statistics), by resampling the sample with replacement and taking the percentiles.
- `overlap`: whether two intervals share a point (a difference they do not resolve).
- `percent`: a proportion with its interval, as printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion k / n; (0, 1) when n is 0 (nothing measured)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at k = 0 or n the bound is exactly 0 or 1 (rounding would leave 1 - 1e-16)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def bootstrap(sample: np.ndarray, statistic: Callable[[np.ndarray], float], resamples: int = 200,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(sample)``, resampling the rows of `sample`."""
    sample = np.asarray(sample)
    if len(sample) < 2:
        raise ValueError(f"a bootstrap needs at least 2 observations, got {len(sample)}")
    rng = np.random.default_rng(seed)
    values = [statistic(sample[rng.integers(0, len(sample), size=len(sample))]) for _ in range(resamples)]
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def percent(value: float, interval) -> str:
    """``95.5% [92.0, 97.6]``: a proportion with its interval, as the reports and the claims page print it."""
    low, high = interval
    return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]
