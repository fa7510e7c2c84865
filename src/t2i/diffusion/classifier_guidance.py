"""Classifier guidance (Dhariwal & Nichol 2021): shift the denoiser by a noisy classifier's gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2i.diffusion.parameterization import X0Fn
from t2i.diffusion.schedule import extract


def classifier_guidance(x0_fn: X0Fn, classifier_logp_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        scale: float, alphas_cumprod: torch.Tensor) -> X0Fn:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14) on an x0-denoiser.

    ``ε̂' = ε̂ - sqrt(1-ᾱ_t)·s·∇_{x_t} log p(y|x_t)``, which in x0 terms is
    ``x̂0' = x̂0 + s·(1-ᾱ_t)/sqrt(ᾱ_t)·∇`` (substituting into x̂0 = (x_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ)); this form
    needs no round trip through ε̂, so a zero gradient is exactly the identity. Where ᾱ_t = 0 (zero terminal
    SNR) x_t holds no information about y and the shift is taken as 0. ``classifier_logp_grad(x_t, t)``
    returns the gradient (see :func:`logp_grad`); the class label lives in its closure.
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = extract(alphas_cumprod, t, x_t.dim())
        coef = torch.where(ab > 0, (1 - ab) / ab.clamp(min=torch.finfo(ab.dtype).tiny).sqrt(), 0.0)
        grad = classifier_logp_grad(x_t, t)
        return x0_fn(x_t, t) + (scale * coef).to(device=x_t.device, dtype=x_t.dtype) * grad

    return guided


def logp_grad(log_prob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """``∇_{x_t} Σ_b log p(y_b | x_t, t)`` by autograd, from ``log_prob_fn(x_t, t) -> [B]`` log-probabilities.

    Gradients are enabled inside, so it works under the samplers' ``torch.no_grad``.
    """

    def grad_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(log_prob_fn(x, t).sum(), x)
        return g

    return grad_fn
