"""Thresholding inside the sampler: under strong guidance x̂0 leaves the data range; static and dynamic
thresholding bring every step's x̂0 (hence the samples) back inside [-1, 1], dynamic keeping the shape of the
prediction (Saharia et al. 2022, sec. 2.3)."""

import pytest
import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.diffusion import make_schedule
from t2i.pipelines.sampling import SamplerSettings, denoiser, sample


class Overshooting(nn.Module):
    """x0-prediction 0.9·pattern given the condition vector, 0 without: CFG scale s predicts 0.9·s·pattern."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pattern", torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t, context=None, context_mask=None, vector=None, concat=None):
        return 0.9 * self.pattern * vector[:, :1, None, None] * self.scale


@pytest.mark.parametrize("kind", ["none", "static", "dynamic"])
def test_thresholding_bounds_under_high_guidance(kind):
    ac = make_schedule(kind="linear", T=1000)
    net = Overshooting()
    cond, uncond = Cond(vector=torch.ones(2, 1)), Cond(vector=torch.zeros(2, 1))
    settings = SamplerSettings(steps=5, guidance_scale=8.0, thresholding=kind, percentile=0.95)
    x0_fn = denoiser(net, ac, "x0", cond, uncond, settings)
    with torch.no_grad():
        x0 = x0_fn(torch.randn(2, 3, 4, 4), torch.tensor([500, 500]))
    out = sample(net, ac, "x0", (2, 3, 4, 4), cond, uncond, settings, generator=torch.Generator().manual_seed(0))
    if kind == "none":
        assert x0.abs().max() == pytest.approx(7.2, rel=1e-4) and out.abs().max() > 7
    else:
        assert x0.abs().max() <= 1 + 1e-6 and out.abs().max() <= 1 + 1e-5
    if kind == "dynamic":  # rescaled, not clipped: the 95th-percentile magnitude maps to 1, order is kept
        assert (x0.flatten(1).argsort(1) == net.pattern.flatten(1).expand(2, -1).argsort(1)).float().mean() > 0.85
        assert (x0.abs() >= 1 - 1e-6).float().mean() < 0.1
    if kind == "static":  # clipped: most values saturate
        assert (x0.abs() >= 1 - 1e-6).float().mean() > 0.8
