"""Low-res conditioning of super-resolution stages: blur, noise augmentation, and that the random
degradation happens in training only (sampling uses the fixed levels)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from t2i.conditioning.lowres import LowResDegradation, downsample, gaussian_blur, noise_augment


def test_blur_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    sigmas = torch.tensor([0.0, 0.5, 1.2])
    out = gaussian_blur(x, sigmas, radius=4)
    torch.testing.assert_close(out[0], x[0])
    for i in (1, 2):
        ref = tv_gaussian_blur(x[i:i + 1], kernel_size=9, sigma=float(sigmas[i]))
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)


def test_blur_keeps_constant_images():
    x = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(x, torch.tensor([0.7, 2.0])), x)


def test_noise_augment_endpoints_and_variance():
    x = torch.randn(4, 3, 8, 8)
    noise = torch.randn(4, 3, 8, 8)
    out = noise_augment(x, torch.tensor([0.0, 1.0, 0.5, 0.5]), noise)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], noise[1], atol=1e-6, rtol=0)
    c = torch.cos(torch.tensor(torch.pi / 4))
    torch.testing.assert_close(out[2], c * x[2] + c * noise[2])


def test_downsample_shape_and_range():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    lo = downsample(x, 16)
    assert lo.shape == (2, 3, 16, 16) and lo.min() >= -1 and lo.max() <= 1
    assert downsample(lo, 16) is lo


def test_degradation_random_in_training_fixed_at_sampling():
    deg = LowResDegradation(blur_prob=0.5, blur_sigma=(0.3, 0.9), noise_prob=0.5, noise_level=(0.1, 0.4),
                            sample_noise_level=0.0)
    low = torch.rand(512, 3, 8, 8) * 2 - 1
    deg.train()
    out, levels = deg(low, generator=torch.Generator().manual_seed(0))
    noise, blur = levels[:, 0], levels[:, 1]
    assert 0.35 < (noise > 0).float().mean() < 0.65 and 0.35 < (blur > 0).float().mean() < 0.65
    assert noise[noise > 0].min() >= 0.1 and noise.max() <= 0.4
    assert blur[blur > 0].min() >= 0.3 and blur.max() <= 0.9
    untouched = (noise == 0) & (blur == 0)
    assert untouched.any() and torch.equal(out[untouched], low[untouched])
    assert not torch.allclose(out[~untouched], low[~untouched])
    deg.eval()
    out, levels = deg(low)
    assert torch.equal(out, low) and torch.equal(levels, torch.zeros(512, 2))


def test_fixed_sampling_noise_level():
    deg = LowResDegradation(noise_prob=1.0, sample_noise_level=0.2).eval()
    low = torch.zeros(4, 3, 8, 8)
    out, levels = deg(low, generator=torch.Generator().manual_seed(1))
    assert torch.equal(levels[:, 0], torch.full((4,), 0.2)) and torch.equal(levels[:, 1], torch.zeros(4))
    assert out.std() > 0.2  # sin(0.1 pi) = 0.31 of unit noise


@pytest.mark.parametrize("kwargs", [{"blur_prob": 1.5}, {"noise_level": (0.5, 0.2)}, {"blur_sigma": (-1, 1)},
                                    {"sample_noise_level": 2.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        LowResDegradation(**kwargs)
