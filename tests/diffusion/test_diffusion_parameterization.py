"""q(x_t | x0) moments and the ε / x0 / v conversions (round trips, zero terminal SNR)."""

import pytest
import torch

from t2i.diffusion.parameterization import (
    eps_from_x0,
    q_sample,
    to_x0_eps,
    training_target,
    v_target,
    x0_denoiser,
    x0_from_eps,
)
from t2i.diffusion.schedule import make_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

AC = make_schedule("linear")


def test_q_sample_moments():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([0.7, -1.3, 0.0])
    for t in (0, 250, 999):
        noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x_t = q_sample(x0.double().expand(n, 3), torch.full((n,), t), noise, AC)
        ab = AC[t].item()
        se = (1 / n) ** 0.5  # std error of the mean (variance ≤ 1)
        assert torch.allclose(x_t.mean(0), ab**0.5 * x0.double(), atol=5 * se)
        assert torch.allclose(x_t.var(0), torch.full((3,), 1 - ab, dtype=torch.float64),
                              rtol=0.02, atol=1e-6)


def test_v_target_equation():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ab = AC[t].float().view(4, 1, 1, 1)
    assert torch.allclose(v_target(x0, eps, t, AC), ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6)
    # x_t and v are an orthonormal rotation of (x0, ε): |x_t|² + |v|² = |x0|² + |ε|²
    x_t, v = q_sample(x0, t, eps, AC), v_target(x0, eps, t, AC)
    assert torch.allclose(x_t.pow(2) + v.pow(2), x0.pow(2) + eps.pow(2), atol=1e-5)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_round_trip(kind, zero_snr):
    ac = make_schedule("scaled_linear", zero_terminal_snr=zero_snr)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 400, 998, 999 if not (zero_snr and kind == "eps") else 997])
    x_t = q_sample(x0, t, noise, ac)
    x0_hat, eps_hat = to_x0_eps(kind, training_target(kind, x0, noise, t, ac), x_t, t, ac)
    assert torch.allclose(x0_hat, x0, atol=1e-9)
    assert torch.allclose(eps_hat, noise, atol=1e-9)


def test_float32_round_trip_tolerance():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = q_sample(x0, t, noise, AC)
    for kind in ("eps", "x0", "v"):
        x0_hat, eps_hat = to_x0_eps(kind, training_target(kind, x0, noise, t, AC), x_t, t, AC)
        assert x0_hat.dtype == torch.float32
        # ε → x0 divides by sqrt(ᾱ_999) ≈ 0.0064 and x0 → ε by sqrt(1-ᾱ_0) = 0.01: float32 error is amplified
        assert torch.allclose(x0_hat, x0, atol=2e-4) and torch.allclose(eps_hat, noise, atol=2e-4)


def test_eps_cannot_give_x0_at_zero_terminal_snr():
    ac = make_schedule("linear", zero_terminal_snr=True)
    x_t, eps = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([5, 999])
    with pytest.raises(ValueError, match="zero terminal SNR"):
        to_x0_eps("eps", eps, x_t, t, ac)
    with pytest.raises(ValueError):
        x0_from_eps(x_t, eps, t, ac)
    # at ᾱ = 0: x_t is pure noise, so ε̂ = x_t and a v-prediction gives x̂0 = -v
    x0_hat, eps_hat = to_x0_eps("v", eps, x_t, t, ac)
    assert torch.equal(eps_hat[1], x_t[1]) and torch.equal(x0_hat[1], -eps[1])
    assert torch.equal(eps_from_x0(x_t, eps, t, ac)[1], x_t[1])


def test_x0_denoiser_and_bad_kind():
    x_t, t = torch.randn(3, 2), torch.tensor([1, 2, 3])
    fn = x0_denoiser(lambda x, t: torch.zeros_like(x), "eps", AC)
    assert torch.allclose(fn(x_t, t), x_t / AC[t].sqrt().float()[:, None])
    with pytest.raises(ValueError):
        to_x0_eps("score", x_t, x_t, t, AC)
