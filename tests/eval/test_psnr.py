"""PSNR: per image and over a whole batch, for [-1, 1] images (data range 2)."""

import math

import pytest
import torch

from t2i.eval.psnr import psnr


def test_psnr_per_image():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    noisy = x.clone()
    noisy[0] += 0.1  # mse 0.01
    noisy[1] -= 0.5  # mse 0.25
    p = psnr(x, noisy)
    assert p.shape == (3,)
    assert p[0].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-4)
    assert p[1].item() == pytest.approx(10 * math.log10(4 / 0.25), rel=1e-4)
    assert math.isinf(p[2].item())


def test_psnr_of_a_batch_is_that_of_its_mean_squared_error():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    noisy = x.clone()
    noisy[0] += 0.1
    noisy[1] -= 0.5  # batch mse (0.01 + 0.25 + 0) / 3
    p = psnr(x, noisy, per_image=False)
    assert p.shape == ()
    assert p.item() == pytest.approx(10 * math.log10(4 / (0.26 / 3)), rel=1e-4)
    assert psnr(x, noisy, data_range=1.0, per_image=False).item() == pytest.approx(p.item() - 20 * math.log10(2),
                                                                                  rel=1e-4)
