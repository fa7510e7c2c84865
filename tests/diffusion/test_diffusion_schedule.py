"""Schedules: known values of the linear / scaled-linear / cosine schedules, zero terminal SNR, gathering."""

import math

import pytest
import torch

from t2i.diffusion.schedule import (
    alphas_cumprod,
    cosine_betas,
    extract,
    linear_betas,
    make_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    snr,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_linear_schedule_known_values():
    betas = linear_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    ac = alphas_cumprod(betas)
    assert ac[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert ac[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)  # DDPM's ᾱ_T
    # closed form of the product: Π (1 - β_s)
    assert ac[9].item() == pytest.approx(math.prod(1 - b for b in betas[:10].tolist()), rel=1e-14)


def test_scaled_linear_schedule_matches_stable_diffusion():
    betas = scaled_linear_betas(1000, 0.00085, 0.012)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999), rtol=1e-9)
    ac = make_schedule("scaled_linear")
    assert ac[0].item() == pytest.approx(1 - 0.00085)
    assert ac[-1].item() == pytest.approx(0.0047, abs=1e-4)


def test_cosine_schedule_follows_closed_form():
    T, s = 1000, 0.008
    ac = alphas_cumprod(cosine_betas(T, s))

    def f(tau):
        return math.cos((tau / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 100, 499, 900):  # index t holds ᾱ(t+1) = f(t+1)/f(0)
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert ac[499].item() == pytest.approx(0.4938, abs=1e-4)
    assert cosine_betas(T, s).max().item() == pytest.approx(0.999)  # clipped final beta
    assert ac[-1].item() < 1e-8


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(kind):
    ac = make_schedule(kind)
    z = make_schedule(kind, zero_terminal_snr=True)
    assert z.dtype == torch.float64
    assert z[-1].item() == 0.0
    assert z[0].item() == pytest.approx(ac[0].item(), abs=1e-14)
    assert (z.diff() < 0).all()
    # Algorithm 1: sqrt(ᾱ) is an affine map of the original sqrt(ᾱ)
    a, b = ac.sqrt(), z.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    assert torch.allclose(b, slope * (a - a[-1]), atol=1e-12)
    assert torch.equal(rescale_zero_terminal_snr(ac), z)


def test_snr_and_unknown_kind():
    ac = make_schedule("linear")
    s = snr(ac)
    assert torch.allclose(s, ac / (1 - ac))
    assert (s.diff() < 0).all()
    assert snr(make_schedule("linear", zero_terminal_snr=True))[-1].item() == 0.0
    with pytest.raises(ValueError):
        make_schedule("quadratic")


def test_extract_shapes_and_values():
    ac = make_schedule("linear")
    t = torch.tensor([0, 5, 999])
    out = extract(ac, t, 4)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float64
    assert torch.equal(out.flatten(), ac[t])
    assert extract(ac, 7, 3).shape == (1, 1, 1)
