"""DDPM / DDIM samplers against the papers' equations, and end-to-end with an analytic Gaussian denoiser."""

import math

import pytest
import torch

from t2i.diffusion.parameterization import eps_from_x0, q_sample
from t2i.diffusion.samplers import (
    alpha_bars,
    ddim_invert,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    timesteps,
)
from t2i.diffusion.schedule import linear_betas, make_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

AC = make_schedule("linear")
MU, S = 0.3, 0.5


def gaussian_x0_fn(ac, mu=MU, s=S):
    """Optimal denoiser for data N(μ, s²I): E[x0|x_t] = μ + sqrt(ᾱ)s²/(ᾱs² + 1-ᾱ)·(x_t - sqrt(ᾱ)μ)."""

    def x0_fn(x_t, t):
        ab = ac[t].to(x_t.dtype).view(-1, *[1] * (x_t.dim() - 1))
        return mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t - ab.sqrt() * mu)

    return x0_fn


def test_timesteps_spacings():
    assert timesteps(1000, 50, "leading").tolist() == list(range(980, -1, -20))
    assert timesteps(1000, 50, "leading", offset=1).tolist() == list(range(981, 0, -20))
    assert timesteps(1000, 50, "trailing").tolist() == list(range(999, 0, -20))
    lin = timesteps(1000, 50, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and len(lin) == 50
    assert timesteps(10, 10, "trailing").tolist() == list(range(9, -1, -1))
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 7, 333, 1000):
            ts = timesteps(1000, steps, spacing)
            assert ts.dtype == torch.long and len(ts) == steps
            assert (ts.diff() < 0).all() and ts.min() >= 0 and ts.max() <= 999
    with pytest.raises(ValueError):
        timesteps(1000, 1001)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_perfect_denoiser_returns_x0(spacing, eta):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    for steps in (1, 7, 50, 1000):
        out = ddim_sample(lambda x, t: x0, x0.shape, AC, steps=steps, eta=eta, generator=g, spacing=spacing)
        assert torch.equal(out, x0)
    out = ddpm_sample(lambda x, t: x0, x0.shape, AC, steps=20, generator=g, spacing=spacing)
    assert torch.equal(out, x0)


def test_ddpm_step_is_ho_eq7_on_consecutive_steps():
    betas = linear_betas()
    alphas = 1 - betas
    g = torch.Generator().manual_seed(1)
    x_t, x0, z = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (1, 10, 500, 999):
        ab_t, ab_prev = AC[t], AC[t - 1]
        mean = (ab_prev.sqrt() * betas[t] / (1 - ab_t)) * x0 + (alphas[t].sqrt() * (1 - ab_prev) / (1 - ab_t)) * x_t
        var = (1 - ab_prev) / (1 - ab_t) * betas[t]
        out = ddpm_step(x_t, x0, ab_t.item(), ab_prev.item(), z)
        assert torch.allclose(out, mean + var.sqrt() * z, rtol=1e-12, atol=1e-12)
    # last step (t_prev = -1): deterministic, returns x̂0
    out = ddpm_step(x_t, x0, AC[0].item(), 1.0, None)
    assert torch.allclose(out, x0, atol=1e-15)


def test_ddim_step_is_song_eq12():
    g = torch.Generator().manual_seed(2)
    x_t, eps, z = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for t, t_prev, eta in ((999, 979, 0.0), (500, 250, 0.3), (40, 0, 1.0), (20, -1, 1.0)):
        a_t = AC[t].item()
        a_p = AC[t_prev].item() if t_prev >= 0 else 1.0
        x0_pred = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        expected = math.sqrt(a_p) * x0_pred + math.sqrt(1 - a_p - sigma**2) * eps + sigma * z
        out = ddim_step(x_t, x0_pred, a_t, a_p, eta, z)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
        assert ddim_sigma(a_t, a_p, eta) == pytest.approx(sigma, rel=1e-14)


def test_ddim_eta1_equals_ddpm_per_step_on_any_subset():
    x0_fn = gaussian_x0_fn(AC)
    g = torch.Generator().manual_seed(3)
    x_t, z = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    for t, t_prev in ((999, 998), (1, 0), (999, 979), (600, 123), (0, -1), (37, -1)):
        ab_t, ab_prev = AC[t].item(), AC[t_prev].item() if t_prev >= 0 else 1.0
        x0 = x0_fn(x_t, torch.full((8,), t))
        a = ddpm_step(x_t, x0, ab_t, ab_prev, z)
        b = ddim_step(x_t, x0, ab_t, ab_prev, 1.0, z)
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (t, t_prev)


@pytest.mark.parametrize("steps", [None, 50])
def test_ddim_eta1_equals_ddpm_trajectory(steps):
    """Same generator ⇒ same noise draws: DDIM(η=1) and DDPM agree step for step (float64)."""
    x0_fn = gaussian_x0_fn(AC)
    ts = torch.arange(999, -1, -1) if steps is None else timesteps(1000, steps)
    traj = {}
    for name in ("ddpm", "ddim"):
        g = torch.Generator().manual_seed(4)
        x_T = torch.randn(16, 3, generator=g, dtype=torch.float64)
        traj[name] = []
        cb = lambda i, t, x, x0, out=traj[name]: out.append(x)
        if name == "ddpm":
            ddpm_sample(x0_fn, x_T, AC, generator=g, timesteps=ts, callback=cb)
        else:
            ddim_sample(x0_fn, x_T, AC, eta=1.0, generator=g, timesteps=ts, callback=cb)
    assert len(traj["ddpm"]) == len(ts)
    err = max((a - b).abs().max().item() for a, b in zip(traj["ddpm"], traj["ddim"], strict=True))
    assert err < 1e-10


def test_alpha_bars_read_the_schedule_once_and_end_at_clean_data():
    ab = alpha_bars(AC, [999, 500, 0])
    assert ab == [AC[999].item(), AC[500].item(), AC[0].item(), 1.0]
    assert all(isinstance(a, float) for a in ab)


def test_ddim_eta0_is_deterministic():
    x0_fn = gaussian_x0_fn(AC)
    x_T = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    a = ddim_sample(x0_fn, x_T, AC, steps=25, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(x0_fn, x_T, AC, steps=25, generator=torch.Generator().manual_seed(2))
    c = ddim_sample(x0_fn, x_T, AC, steps=25)
    assert torch.equal(a, b) and torch.equal(a, c)
    # stochastic variants do depend on the generator; the same seed reproduces them
    s1 = ddim_sample(x0_fn, (4, 3), AC, steps=10, eta=1.0, generator=torch.Generator().manual_seed(7))
    s2 = ddim_sample(x0_fn, (4, 3), AC, steps=10, eta=1.0, generator=torch.Generator().manual_seed(7))
    s3 = ddim_sample(x0_fn, (4, 3), AC, steps=10, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


def test_ddim_inversion_reconstructs():
    x0_fn = gaussian_x0_fn(AC)
    x0 = MU + S * torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errors = {}
    for steps in (50, 500):
        x_T = ddim_invert(x0_fn, x0, AC, steps=steps)
        assert x_T.std().item() == pytest.approx(1.0, abs=0.15)  # latents look like N(0, I)
        errors[steps] = (ddim_sample(x0_fn, x_T, AC, steps=steps) - x0).abs().max().item()
    assert errors[500] < 1e-2 and errors[500] < errors[50] / 5  # first-order convergence


def test_ddpm_end_to_end_matches_gaussian_data():
    x = ddpm_sample(gaussian_x0_fn(AC), (4096, 4), AC, generator=torch.Generator().manual_seed(7))
    assert x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("zero_snr,spacing", [(False, "leading"), (True, "trailing")])
def test_ddim_many_steps_matches_gaussian_data(zero_snr, spacing):
    ac = make_schedule("linear", zero_terminal_snr=zero_snr)
    x = ddim_sample(gaussian_x0_fn(ac), (4096, 4), ac, steps=500, spacing=spacing,
                    generator=torch.Generator().manual_seed(8))
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_q_sample_then_one_step_back_with_true_x0():
    """With x̂0 = x0, a DDIM(η=0) step keeps the noise direction: x_{t'} = q_sample(x0, t', ε)."""
    g = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    x_t = q_sample(x0, torch.tensor([700, 700]), eps, AC)
    out = ddim_step(x_t, x0, AC[700].item(), AC[300].item())
    assert torch.allclose(out, q_sample(x0, torch.tensor([300, 300]), eps, AC), atol=1e-12)
    assert torch.allclose(eps_from_x0(x_t, x0, torch.tensor([700, 700]), AC), eps, atol=1e-12)
