"""Static and dynamic thresholding of x̂0 (Saharia et al. 2022, §2.3)."""

import pytest
import torch

from t2i.diffusion.thresholding import dynamic_threshold, static_threshold, thresholded

pytestmark = pytest.mark.usefixtures("single_thread")


def test_static_threshold():
    x = torch.tensor([[-3.0, -0.5, 0.2, 1.5]])
    assert torch.equal(static_threshold(x), torch.tensor([[-1.0, -0.5, 0.2, 1.0]]))


def test_dynamic_threshold():
    g = torch.Generator().manual_seed(1)
    inside = torch.rand(4, 3, 8, 8, generator=g) * 1.98 - 0.99
    assert torch.equal(dynamic_threshold(inside, percentile=1.0), inside)
    assert torch.equal(dynamic_threshold(inside, percentile=0.995), inside)  # s = max(1, q) = 1
    outliers = torch.randn(4, 3, 8, 8, generator=g) * 3
    out = dynamic_threshold(outliers, percentile=1.0)
    assert out.abs().max() <= 1.0 + 1e-6
    s = outliers.flatten(1).abs().max(1).values.view(4, 1, 1, 1)
    assert torch.allclose(out, outliers / s)  # p = 1: rescaled by the per-sample max
    out = dynamic_threshold(outliers, percentile=0.9)
    q = torch.quantile(outliers.flatten(1).abs(), 0.9, dim=1).view(4, 1, 1, 1)
    assert torch.allclose(out, outliers.clamp(-q, q) / q)
    assert out.abs().amax(dim=(1, 2, 3)).allclose(torch.ones(4))
    # samples are thresholded independently
    mixed = torch.cat([inside[:1], outliers[:1]])
    res = dynamic_threshold(mixed, 1.0)
    assert torch.equal(res[0], inside[0]) and res[1].abs().max() <= 1.0 + 1e-6


def test_thresholded_wrapper():
    x0 = torch.full((2, 3), 4.0)
    fn = lambda x, t: x0
    assert thresholded(fn, "none") is fn
    assert torch.equal(thresholded(fn, "static")(x0, None), torch.ones(2, 3))
    assert torch.equal(thresholded(fn, "dynamic", 0.995)(x0, None), torch.ones(2, 3))
    with pytest.raises(ValueError):
        thresholded(fn, "soft")
