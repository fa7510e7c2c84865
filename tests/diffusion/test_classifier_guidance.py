"""Classifier guidance (Dhariwal & Nichol 2021) on an x0-denoiser."""

import pytest
import torch

from t2i.diffusion.classifier_guidance import classifier_guidance, logp_grad
from t2i.diffusion.parameterization import eps_from_x0
from t2i.diffusion.samplers import ddim_sample
from t2i.diffusion.schedule import make_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

AC = make_schedule("scaled_linear")


def test_classifier_guidance_zero_grad_is_identity_and_matches_eps_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    x0_fn = lambda x, t: torch.tanh(x)
    same = classifier_guidance(x0_fn, lambda x, t: torch.zeros_like(x), 10.0, AC)
    assert torch.equal(same(x, t), x0_fn(x, t))

    grad = torch.randn(3, 4, generator=g, dtype=torch.float64)
    scale = 2.5
    guided = classifier_guidance(x0_fn, lambda x, t: grad, scale, AC)(x, t)
    eps = eps_from_x0(x, x0_fn(x, t), t, AC)
    expected_eps = eps - (1 - AC[t]).sqrt()[:, None] * scale * grad  # Dhariwal & Nichol, eq. 14
    assert torch.allclose(eps_from_x0(x, guided, t, AC), expected_eps, atol=1e-9)


def test_classifier_guidance_with_autograd_under_no_grad_sampler():
    target = torch.tensor([1.0, -1.0])
    log_prob = lambda x, t: -((x - target) ** 2).sum(-1)
    grad_fn = logp_grad(log_prob)
    x = torch.zeros(2, 2)
    assert torch.allclose(grad_fn(x, None), 2 * target.expand(2, 2))
    ac = make_schedule("linear", zero_terminal_snr=True)  # ᾱ = 0 at t=999: no shift there
    x0_fn = classifier_guidance(lambda x, t: torch.zeros_like(x), grad_fn, 1.0, ac)
    out = ddim_sample(x0_fn, (64, 2), ac, steps=20, spacing="trailing", generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out).all()
    assert (out.mean(0) * target > 0).all()  # pulled towards the class
