"""95% confidence intervals for the accuracies the reports and the claims page publish.

- `wilson`: an accuracy of k right out of n (Wilson 1927 score interval; unlike the normal approximation it
  stays inside [0, 1] and is usable at 0 or n successes and at small n).
- `percent`: a proportion with its interval, as printed.
"""

from __future__ import annotations

import math

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


def percent(value: float, interval) -> str:
    """``95.5% [92.0, 97.6]``: a proportion with its interval, as the reports and the claims page print it."""
    low, high = interval
    return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
