"""DDPM ancestral and DDIM samplers, plus DDIM inversion, as pure functions over a denoiser.

The denoiser is any ``x0_fn(x_t, t) -> x̂0`` with ``t`` a long tensor of shape ``[B]``; ε̂ always follows
from x̂0 (``ε̂ = (x_t - sqrt(ᾱ_t)·x̂0)/sqrt(1-ᾱ_t)``), so thresholding and guidance wrappers on x̂0 carry
over. A run walks a strictly decreasing list of timesteps; the step after the last one goes to "clean
data", ``t_prev = -1`` with ᾱ_{-1} := 1. Since β_t is re-derived as ``1 - ᾱ_t/ᾱ_{t_prev}``, every step works
on any decreasing subset of timesteps. Coefficients are float64 Python scalars, read from the schedule once
per run (a read per step from a GPU tensor would synchronise the device every step).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from t2i.diffusion.parameterization import X0Fn
from t2i.diffusion.seeded_random import randn

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def timesteps(T: int, steps: int, spacing: str = "leading", offset: int = 0) -> torch.Tensor:
    """A strictly decreasing long tensor of ``steps`` timesteps in ``[0, T-1]`` (Lin et al. 2024, Table 2).

    - "leading":  ``(T // steps)·[steps-1, ..., 0] + offset`` (DDIM / diffusers default; never hits T-1).
    - "trailing": ``round(T - k·T/steps) - 1`` for k = 0..steps-1 (starts at T-1: use with zero terminal SNR).
    - "linspace": ``round(linspace(T-1, 0, steps))``.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "leading":
        ts = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps) + offset
    elif spacing == "trailing":
        ts = torch.round(T - torch.arange(steps, dtype=torch.float64) * (T / steps)) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(T - 1, 0, steps, dtype=torch.float64))
    else:
        raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    ts = ts.long()
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"offset {offset} pushes timesteps outside [0, {T - 1}]")
    return ts


def alpha_bars(ac: torch.Tensor, ts: list[int]) -> list[float]:
    """``[ᾱ_{ts[0]}, ..., ᾱ_{ts[-1]}, ᾱ_{-1} = 1]`` as float64 Python scalars: one host read of the schedule."""
    host = ac.detach().double().cpu()
    return [float(host[t]) for t in ts] + [1.0]


def ddpm_step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: float, ab_prev: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step ``x_t → x_{t_prev} ~ q(x_{t_prev} | x_t, x̂0)`` (Ho et al. 2020, eqs. 6-7).

    With β_t := 1 - ᾱ_t/ᾱ_{t_prev}: ``μ̃ = sqrt(ᾱ_{t_prev})·β_t/(1-ᾱ_t)·x̂0 + sqrt(1-β_t)·(1-ᾱ_{t_prev})/(1-ᾱ_t)·x_t``
    and ``β̃_t = (1-ᾱ_{t_prev})/(1-ᾱ_t)·β_t``; ``noise ~ N(0, I)`` (None on the last step, where β̃ = 0).
    """
    beta = 1 - ab_t / ab_prev
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x_t
    return _plus_noise(mean, math.sqrt((1 - ab_prev) / (1 - ab_t) * beta), noise)


def ddim_sigma(ab_t: float, ab_prev: float, eta: float) -> float:
    """``σ_t(η) = η·sqrt((1-ᾱ_{t_prev})/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_{t_prev})`` (Song et al. 2021, eq. 16)."""
    return eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: float, ab_prev: float, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12):
    ``x_{t_prev} = sqrt(ᾱ_{t_prev})·x̂0 + sqrt(1-ᾱ_{t_prev}-σ²)·ε̂ + σ·noise``, σ from :func:`ddim_sigma`.

    η = 0 is deterministic (``noise`` unused); η = 1 is the DDPM posterior (same mean and variance).
    """
    eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    sigma = ddim_sigma(ab_t, ab_prev, eta)
    mean = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
    return _plus_noise(mean, sigma, noise)


@torch.no_grad()
def ddim_sample(x0_fn: X0Fn, shape_or_x_T, ac: torch.Tensor, steps: int = 50, eta: float = 0.0,
                generator: torch.Generator | None = None, timesteps=None, callback: Callback | None = None,
                spacing: str = "leading", device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from ``x_T`` (or ``N(0, I)`` of ``shape``) to x0.

    ``timesteps`` (decreasing) overrides ``steps``/``spacing``. The last step returns x̂0 of the last
    evaluation. ``callback(i, t, x_{t_prev}, x̂0)`` runs after each step. For η > 0 noise is drawn from
    ``generator`` once per step but the last, as :func:`ddpm_sample` draws it.
    """
    x = _start(shape_or_x_T, generator, device, dtype)
    ts = _checked(ac.shape[0], steps, spacing, timesteps)
    ab = alpha_bars(ac, ts)
    for i, t in enumerate(ts):
        x0 = x0_fn(x, _batch_of(t, x))
        noise = _noise_like(x, generator) if eta > 0 and i + 1 < len(ts) else None
        x = ddim_step(x, x0, ab[i], ab[i + 1], eta, noise)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddpm_sample(x0_fn: X0Fn, shape_or_x_T, ac: torch.Tensor, steps: int | None = None,
                generator: torch.Generator | None = None, timesteps=None, callback: Callback | None = None,
                spacing: str = "leading", device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) through all ``T`` steps (``steps=None``) or a subset.

    On a subset every step samples the exact posterior q(x_{t_prev} | x_t, x̂0) (see :func:`ddpm_step`).
    Arguments as in :func:`ddim_sample`.
    """
    if timesteps is None and steps is None:
        timesteps = torch.arange(ac.shape[0] - 1, -1, -1)
    x = _start(shape_or_x_T, generator, device, dtype)
    ts = _checked(ac.shape[0], steps or ac.shape[0], spacing, timesteps)
    ab = alpha_bars(ac, ts)
    for i, t in enumerate(ts):
        x0 = x0_fn(x, _batch_of(t, x))
        noise = _noise_like(x, generator) if i + 1 < len(ts) else None
        x = ddpm_step(x, x0, ab[i], ab[i + 1], noise)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim_invert(x0_fn: X0Fn, x0: torch.Tensor, ac: torch.Tensor, steps: int = 50, timesteps=None,
                spacing: str = "leading", callback: Callback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion x0 → x_T: eq. 12 with η = 0 run upwards (Song et al. 2021, §4.3).

    Walks ``-1 → t_0 → ... → t_{N-1}`` (the sampling timesteps reversed), with the usual approximation
    ε̂(x_{t_next}, t_next) ≈ ε̂(x_t, t_next), so :func:`ddim_sample` with the same timesteps and η = 0 maps
    the result back to ``x0`` up to that discretisation error. ``callback(i, t_next, x_next, x̂0)`` runs
    after each step.
    """
    ts = _checked(ac.shape[0], steps, spacing, timesteps)[::-1]
    ab = [1.0] + alpha_bars(ac, ts)[:-1]  # ab[i] = ᾱ of the current point, ab[i + 1] = ᾱ of the next
    x = x0
    for i, t_next in enumerate(ts):
        x0_at_next = x0_fn(x, _batch_of(t_next, x))
        eps = (x - math.sqrt(ab[i + 1]) * x0_at_next) / math.sqrt(1 - ab[i + 1])
        x0_hat = (x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])
        x = math.sqrt(ab[i + 1]) * x0_hat + math.sqrt(1 - ab[i + 1]) * eps
        if callback is not None:
            callback(i, t_next, x, x0_hat)
    return x


def _checked(T: int, steps: int, spacing: str, ts) -> list[int]:
    ts = timesteps(T, steps, spacing) if ts is None else torch.as_tensor(ts)
    ts = [int(t) for t in ts]
    if any(a <= b for a, b in itertools.pairwise(ts)) or ts[-1] < 0 or ts[0] >= T:
        raise ValueError("timesteps must be strictly decreasing integers in [0, T-1]")
    return ts


def _start(shape_or_x_T, generator, device, dtype) -> torch.Tensor:
    if isinstance(shape_or_x_T, torch.Tensor):
        return shape_or_x_T
    return randn(shape_or_x_T, generator=generator, device=device, dtype=dtype or torch.float32)


def _batch_of(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _plus_noise(mean: torch.Tensor, std: float, noise: torch.Tensor | None) -> torch.Tensor:
    if std == 0:
        return mean
    if noise is None:
        raise ValueError("this step has a non-zero variance: pass `noise`")
    return mean + std * noise
