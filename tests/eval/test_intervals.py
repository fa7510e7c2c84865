"""The 95% intervals every published accuracy and FID carries: Wilson's score interval against its closed form
and the normal approximation, the percentile bootstrap against a known sampling distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from t2i.eval.intervals import Z95, bootstrap, overlap, wilson


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


def test_bootstrap_interval_of_a_mean_covers_its_sampling_spread():
    rng = np.random.default_rng(0)
    sample = rng.normal(3.0, 2.0, size=400)
    low, high = bootstrap(sample, np.mean, resamples=400, seed=1)
    half = Z95 * 2.0 / math.sqrt(400)  # the mean's 95% half-width
    assert low < sample.mean() < high and abs((high - low) / 2 - half) < 0.25 * half
    assert bootstrap(sample, np.mean, resamples=400, seed=1) == (low, high)
    with pytest.raises(ValueError):
        bootstrap(sample[:1], np.mean)


def test_overlap():
    assert overlap((0.1, 0.3), (0.3, 0.5)) and overlap((0.2, 0.4), (0.1, 0.5))
    assert not overlap((0.1, 0.2), (0.3, 0.4)) and not overlap((0.3, 0.4), (0.1, 0.2))
