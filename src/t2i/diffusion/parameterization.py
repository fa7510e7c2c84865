"""Forward process q(x_t | x0), training targets, and THE conversion between ε / x0 / v predictions.

Notation: ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` (Ho et al. 2020, eq. 4) and the velocity
``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0`` (Salimans & Ho 2022, §4). Coefficients are computed in float64 from
the schedule and cast to the data's dtype at the point of use.

Zero terminal SNR (ᾱ_{T-1} = 0): x_t carries no signal there, so an ε-prediction cannot give x̂0
(x̂0 = (x_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ) divides by 0). :func:`x0_from_eps` / :func:`to_x0_eps` raise a
``ValueError`` in that case; x0- and v-predictions are well defined everywhere (Lin et al. 2024, §3.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2i.diffusion.schedule import extract

PREDICTIONS = ("eps", "x0", "v")

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # a denoiser as the samplers see it: (x_t, t) -> x̂0


def _coefs(t, ac: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ᾱ_t in float64, sqrt(ᾱ_t), sqrt(1-ᾱ_t)) shaped to broadcast with ``like``; the roots in its dtype."""
    ab = extract(ac, t, like.dim())
    cast = {"device": like.device, "dtype": like.dtype}
    return ab, ab.sqrt().to(**cast), (1 - ab).sqrt().to(**cast)


def _check_kind(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction kind must be one of {PREDICTIONS}, got {kind!r}")


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x0): ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` (Ho et al. 2020, eq. 4)."""
    _, sa, s1 = _coefs(t, alphas_cumprod, x0)
    return sa * x0 + s1 * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Velocity ``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0`` (Salimans & Ho 2022, §4 / Appendix D)."""
    _, sa, s1 = _coefs(t, alphas_cumprod, x0)
    return sa * noise - s1 * x0


def training_target(kind: str, x0: torch.Tensor, noise: torch.Tensor, t,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What a network of prediction ``kind`` ("eps", "x0" or "v") regresses onto."""
    _check_kind(kind)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    return v_target(x0, noise, t, alphas_cumprod)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``ε = (x_t - sqrt(ᾱ_t)·x0) / sqrt(1-ᾱ_t)`` (eq. 4 solved for ε; ᾱ_t < 1 always since β_0 > 0)."""
    _, sa, s1 = _coefs(t, alphas_cumprod, x_t)
    return (x_t - sa * x0) / s1


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1-ᾱ_t)·ε) / sqrt(ᾱ_t)`` (Ho et al. 2020, eq. 4 solved for x0 / eq. 15).

    Raises ``ValueError`` where ᾱ_t = 0 (zero terminal SNR): x0 is not identifiable from ε there.
    """
    ab, sa, s1 = _coefs(t, alphas_cumprod, x_t)
    if (ab == 0).any():
        raise ValueError("x0 cannot be recovered from an ε-prediction where alphas_cumprod == 0 "
                         "(zero terminal SNR); use a v- or x0-prediction model")
    return (x_t - s1 * eps) / sa


def to_x0_eps(kind: str, model_output: torch.Tensor, x_t: torch.Tensor, t,
              alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output of prediction ``kind`` into ``(x̂0, ε̂)``.

    - "eps": ε̂ = output, x̂0 from :func:`x0_from_eps` (undefined where ᾱ_t = 0: raises).
    - "x0":  x̂0 = output, ε̂ from :func:`eps_from_x0`.
    - "v":   x̂0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v̂,  ε̂ = sqrt(1-ᾱ)·x_t + sqrt(ᾱ)·v̂ (Salimans & Ho 2022, §4).
    """
    _check_kind(kind)
    if kind == "eps":
        return x0_from_eps(x_t, model_output, t, alphas_cumprod), model_output
    if kind == "x0":
        return model_output, eps_from_x0(x_t, model_output, t, alphas_cumprod)
    _, sa, s1 = _coefs(t, alphas_cumprod, x_t)
    return sa * x_t - s1 * model_output, s1 * x_t + sa * model_output


def x0_denoiser(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], kind: str,
                alphas_cumprod: torch.Tensor) -> X0Fn:
    """Wrap ``model_fn(x_t, t)`` (predicting ``kind``) into the samplers' ``x0_fn(x_t, t) -> x̂0``."""
    _check_kind(kind)

    def x0_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return to_x0_eps(kind, model_fn(x_t, t), x_t, t, alphas_cumprod)[0]

    return x0_fn
