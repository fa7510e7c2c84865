"""The 95% interval every published accuracy carries: Wilson's score interval against its closed form and the
normal approximation."""

from __future__ import annotations

import math

import pytest

from t2i.eval.intervals import Z95, wilson


def test_wilson_matches_its_formula_and_the_normal_approximation_at_large_n():
    low, high = wilson(45, 100)
    # Wilson (1927): (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert (round(low, 4), round(high, 4)) == (0.3561, 0.5476)  # as statsmodels proportion_confint gives
    p, n = 0.3, 100_000
    normal = Z95 * math.sqrt(p * (1 - p) / n)
    low, high = wilson(int(p * n), n)
    assert abs((high - low) / 2 - normal) < 1e-5
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    assert 0.0 < wilson(0, 10)[1] < 0.35 and 0.65 < wilson(10, 10)[0] < 1.0
    with pytest.raises(ValueError):
        wilson(11, 10)
