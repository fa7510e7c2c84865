"""DDPM ancestral and DDIM samplers, plus DDIM inversion, as pure functions over a denoiser.

The denoiser is any ``x0_fn(x_t, t) -> x̂0`` with ``t`` a long tensor of shape ``[B]``; ε̂ always follows
from x̂0 (``ε̂ = (x_t - sqrt(ᾱ_t)·x̂0)/sqrt(1-ᾱ_t)``), so thresholding/guidance wrappers on x̂0 carry over.
Step functions take Python-int timesteps ``t > t_prev``; ``t_prev = -1`` means "to clean data"
(ᾱ_{-1} := 1). Since β_t is re-derived as ``1 - ᾱ_t/ᾱ_{t_prev}``, every step works on any decreasing
subset of timesteps. Coefficients are computed in float64 and applied as Python scalars.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Sequence

import torch

from t2i.diffusion._random import randn
from t2i.diffusion.parameterization import eps_from_x0

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


_HOST_COPIES: dict[int, tuple[weakref.ref, list[float]]] = {}  # id(schedule) -> (weakref, values)


def _alpha_bar(ac: torch.Tensor, t: int) -> float:
    """ᾱ_t as a Python float, read from a host copy of the schedule made once per schedule tensor: a
    read from a GPU tensor every step would synchronise the device twice per step."""
    if not -1 <= t < ac.shape[0]:
        raise IndexError(f"timestep {t} outside [-1, {ac.shape[0] - 1}]")
    if t < 0:
        return 1.0
    entry = _HOST_COPIES.get(id(ac))
    if entry is None or entry[0]() is not ac:
        if len(_HOST_COPIES) > 64:  # forget schedules that no longer exist
            for key in [k for k, (ref, _) in _HOST_COPIES.items() if ref() is None]:
                del _HOST_COPIES[key]
        entry = _HOST_COPIES[id(ac)] = (weakref.ref(ac), ac.detach().double().cpu().tolist())
    return entry[1][t]


def _denoise(x0_fn: X0Fn, x_t: torch.Tensor, t: int, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) at integer timestep ``t`` for the whole batch."""
    t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    x0 = x0_fn(x_t, t_batch)
    return x0, eps_from_x0(x_t, x0, t_batch, ac)


def _add_noise(x: torch.Tensor, std: float, noise: torch.Tensor | None) -> torch.Tensor:
    if std == 0:
        return x
    if noise is None:
        raise ValueError("this step has a non-zero variance: pass `noise`")
    return x + std * noise


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


_make_timesteps = timesteps


def ddpm_step(x0_fn: X0Fn, x_t: torch.Tensor, t: int, t_prev: int, ac: torch.Tensor,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step ``x_t → x_{t_prev} ~ q(x_{t_prev} | x_t, x̂0)``; returns ``(x_{t_prev}, x̂0)``.

    Posterior of Ho et al. 2020, eqs. 6-7, with β_t := 1 - ᾱ_t/ᾱ_{t_prev}:
    ``μ̃ = sqrt(ᾱ_{t_prev})·β_t/(1-ᾱ_t)·x̂0 + sqrt(1-β_t)·(1-ᾱ_{t_prev})/(1-ᾱ_t)·x_t`` and
    ``β̃_t = (1-ᾱ_{t_prev})/(1-ᾱ_t)·β_t``. ``noise ~ N(0, I)`` (may be None when ``t_prev = -1``).
    """
    ab_t, ab_prev = _alpha_bar(ac, t), _alpha_bar(ac, t_prev)
    beta = 1 - ab_t / ab_prev
    coef_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
    coef_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    var = (1 - ab_prev) / (1 - ab_t) * beta
    x0, _ = _denoise(x0_fn, x_t, t, ac)
    return _add_noise(coef_x0 * x0 + coef_xt * x_t, math.sqrt(var), noise), x0


def ddim_sigma(ab_t: float, ab_prev: float, eta: float) -> float:
    """``σ_t(η) = η·sqrt((1-ᾱ_{t_prev})/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_{t_prev})`` (Song et al. 2021, eq. 16)."""
    return eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))


def ddim_step(x0_fn: X0Fn, x_t: torch.Tensor, t: int, t_prev: int, ac: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12); returns ``(x_{t_prev}, x̂0)``.

    ``x_{t_prev} = sqrt(ᾱ_{t_prev})·x̂0 + sqrt(1-ᾱ_{t_prev}-σ²)·ε̂ + σ·noise`` with σ from :func:`ddim_sigma`.
    η = 0 is deterministic (``noise`` unused); η = 1 gives the DDPM posterior variance β̃.
    """
    ab_t, ab_prev = _alpha_bar(ac, t), _alpha_bar(ac, t_prev)
    sigma = ddim_sigma(ab_t, ab_prev, eta)
    x0, eps = _denoise(x0_fn, x_t, t, ac)
    mean = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
    return _add_noise(mean, sigma, noise), x0


def _initial(shape_or_x_T, generator, device, dtype) -> torch.Tensor:
    if isinstance(shape_or_x_T, torch.Tensor):
        return shape_or_x_T
    return randn(shape_or_x_T, generator=generator, device=device, dtype=dtype or torch.float32)


def _run(step: Callable, x: torch.Tensor, ts: Sequence[int], noisy: bool, generator, callback) -> torch.Tensor:
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = None
        if noisy and t_prev >= 0:
            noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, x0 = step(x, t, t_prev, noise)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _timestep_list(T: int, steps: int, spacing: str, ts) -> list[int]:
    ts = _make_timesteps(T, steps, spacing) if ts is None else torch.as_tensor(ts)
    ts = [int(t) for t in ts]
    if any(a <= b for a, b in itertools.pairwise(ts)) or ts[-1] < 0 or ts[0] >= T:
        raise ValueError("timesteps must be strictly decreasing integers in [0, T-1]")
    return ts


@torch.no_grad()
def ddim_sample(x0_fn: X0Fn, shape_or_x_T, ac: torch.Tensor, steps: int = 50, eta: float = 0.0,
                generator: torch.Generator | None = None, timesteps=None, callback: Callback | None = None,
                spacing: str = "leading", device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from ``x_T`` (or ``N(0, I)`` of ``shape``) to x0.

    ``timesteps`` (decreasing) overrides ``steps``/``spacing``. The final step goes to ``t_prev = -1`` and
    returns x̂0 of the last evaluation. ``callback(i, t, x_{t_prev}, x̂0)`` runs after each step. Noise (for
    η > 0) is drawn from ``generator`` once per step except the last, in the same order as :func:`ddpm_sample`.
    """
    x = _initial(shape_or_x_T, generator, device, dtype)
    ts = _timestep_list(ac.shape[0], steps, spacing, timesteps)

    def step(x, t, t_prev, noise):
        return ddim_step(x0_fn, x, t, t_prev, ac, eta, noise)

    return _run(step, x, ts, eta > 0, generator, callback)


@torch.no_grad()
def ddpm_sample(x0_fn: X0Fn, shape_or_x_T, ac: torch.Tensor, steps: int | None = None,
                generator: torch.Generator | None = None, timesteps=None, callback: Callback | None = None,
                spacing: str = "leading", device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) through all ``T`` steps (``steps=None``) or a subset.

    On a subset every step samples the exact posterior q(x_{t_prev} | x_t, x̂0) (see :func:`ddpm_step`).
    Arguments as in :func:`ddim_sample`.
    """
    T = ac.shape[0]
    if timesteps is None and steps is None:
        timesteps = torch.arange(T - 1, -1, -1)
    x = _initial(shape_or_x_T, generator, device, dtype)
    ts = _timestep_list(T, steps or T, spacing, timesteps)

    def step(x, t, t_prev, noise):
        return ddpm_step(x0_fn, x, t, t_prev, ac, noise)

    return _run(step, x, ts, True, generator, callback)


@torch.no_grad()
def ddim_invert(x0_fn: X0Fn, x0: torch.Tensor, ac: torch.Tensor, steps: int = 50, timesteps=None,
                spacing: str = "leading", callback: Callback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion x0 → x_T: eq. 12 with η = 0 run upwards (Song et al. 2021, §4.3).

    Walks ``-1 → t_0 → ... → t_{N-1}`` (the sampling timesteps reversed). Each step uses the usual
    approximation ε̂(x_{t_next}, t_next) ≈ ε̂(x_t, t_next):
    ``x_next = sqrt(ᾱ_next)·(x_t - sqrt(1-ᾱ_t)·ε̂)/sqrt(ᾱ_t) + sqrt(1-ᾱ_next)·ε̂``, so ``ddim_sample`` with
    the same timesteps and η = 0 maps the result back to ``x0`` up to that discretisation error.
    ``callback(i, t_next, x_next, x̂0)`` runs after each step.
    """
    ts = _timestep_list(ac.shape[0], steps, spacing, timesteps)[::-1]
    x, t_cur = x0, -1
    for i, t_next in enumerate(ts):
        ab_cur, ab_next = _alpha_bar(ac, t_cur), _alpha_bar(ac, t_next)
        _, eps = _denoise(x0_fn, x, t_next, ac)
        x0_hat = (x - math.sqrt(1 - ab_cur) * eps) / math.sqrt(ab_cur)
        x = math.sqrt(ab_next) * x0_hat + math.sqrt(1 - ab_next) * eps
        t_cur = t_next
        if callback is not None:
            callback(i, t_next, x, x0_hat)
    return x
