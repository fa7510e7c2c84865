"""Noise schedules: β_t → ᾱ_t (alphas_cumprod), SNR, and per-timestep gathering.

Conventions (DDPM / diffusers): T steps, integer timesteps ``t = 0..T-1``; ``t = 0`` is the least noisy
step with ``ᾱ_0 = 1 - β_0``. Everything here is computed in float64 and returned in float64; callers cast
(e.g. ``extract(...).to(x.dtype)``) only when multiplying with data.
"""

from __future__ import annotations

import math

import torch

_F64 = torch.float64


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_t linearly spaced in ``[beta_start, beta_end]`` (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=_F64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule: sqrt(β_t) linearly spaced, then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=_F64) ** 2


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ``ᾱ(τ) = f(τ)/f(0)`` with ``f(τ) = cos²((τ/T + s)/(1 + s) · π/2)``, and
    ``β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta)`` so that index ``t`` holds ``ᾱ_t ≈ f(t+1)/f(0)``.
    ``max_beta`` clips the singular last steps (f(T) = 0).
    """
    tau = torch.arange(T + 1, dtype=_F64) / T
    f = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``ᾱ_t = Π_{s≤t} (1 - β_s)`` (Ho et al. 2020, notation above eq. 4), in float64."""
    return torch.cumprod(1 - betas.to(_F64), dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule to zero terminal SNR (Lin et al. 2024, Algorithm 1).

    ``sqrt(ᾱ)`` is shifted so its last value is 0 and scaled so its first value is unchanged; the result
    has ``ᾱ_{T-1} = 0`` (pure noise at the last step) and the same ``ᾱ_0``. Models trained on it should
    predict ``v`` or ``x0``: an ε-prediction cannot give x̂0 at ``ᾱ = 0``.
    """
    sqrt_ab = alphas_cumprod.to(_F64).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def make_schedule(kind: str = "linear", T: int = 1000, zero_terminal_snr: bool = False, **kw) -> torch.Tensor:
    """ᾱ_t (float64, length ``T``) for ``kind`` in {"linear", "scaled_linear", "cosine"}.

    Extra keyword arguments go to the β function (``beta_start``/``beta_end`` or ``s``/``max_beta``).
    """
    makers = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}
    if kind not in makers:
        raise ValueError(f"schedule kind must be one of {sorted(makers)}, got {kind!r}")
    ac = alphas_cumprod(makers[kind](T, **kw))
    return rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``SNR_t = ᾱ_t / (1 - ᾱ_t)`` (Kingma et al. 2021, eq. 2); 0 where ᾱ = 0."""
    ac = alphas_cumprod.to(_F64)
    return ac / (1 - ac)


def extract(values: torch.Tensor, t: torch.Tensor | int, ndim: int) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against a tensor of ``ndim`` dims whose batch dim matches ``t``.

    ``t`` is an int (result shape ``(1,)*ndim``) or an integer tensor of shape ``[B]`` (result
    ``[B, 1, ..., 1]``). The gather happens on ``values``' device and keeps its dtype (float64 for a
    schedule); cast/move with ``.to(x)`` or ``.to(x.dtype)`` at the point of use.
    """
    idx = torch.as_tensor(t, dtype=torch.long).to(values.device)
    out = values[idx]
    return out.reshape(*out.shape, *([1] * (ndim - out.dim())))
