"""The denoising training loss: timestep/noise sampling, Min-SNR-γ weighting, offset noise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2i.diffusion.parameterization import PREDICTIONS, q_sample, training_target
from t2i.diffusion.schedule import extract, snr
from t2i.diffusion.seeded_random import randint, randn


def loss_weights(kind: str, snr_t: torch.Tensor, gamma: float = 5.0, prediction: str = "eps") -> torch.Tensor:
    """Per-sample loss weights for an MSE on ``prediction``'s target.

    - "uniform": all ones (the "simple" loss of Ho et al. 2020, eq. 14).
    - "min_snr": Min-SNR-γ (Hang et al. 2023, eq. 9 and §3.4): the x0-space weight min(SNR, γ), rewritten for
      each target: ε → min(SNR, γ)/SNR, x0 → min(SNR, γ), v → min(SNR, γ)/(SNR + 1).
      The ε weight is evaluated as min(1, γ/SNR), which is 1 (not NaN) at SNR = 0.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if kind == "uniform":
        return torch.ones_like(snr_t)
    if kind != "min_snr":
        raise ValueError(f"weighting must be 'uniform' or 'min_snr', got {kind!r}")
    clipped = snr_t.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / snr_t).clamp(max=1.0)
    if prediction == "x0":
        return clipped
    return clipped / (snr_t + 1)


def sample_timesteps(batch: int, T: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``t ~ Uniform{0, ..., T-1}`` of shape ``[batch]`` (Ho et al. 2020, Algorithm 1)."""
    return randint(T, (batch,), generator=generator, device=device)


def offset_noise(shape, strength: float, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """``ε + strength·δ`` with ``δ ~ N(0, 1)`` constant over the spatial dims of each (sample, channel).

    With ``strength = 0`` this is plain ``N(0, I)`` noise (and draws nothing extra). Offset noise
    (Guttenberg 2023) lets the model change the per-channel mean, e.g. generate very dark/bright images.
    """
    noise = randn(shape, generator=generator, device=device, dtype=dtype)
    if strength == 0:
        return noise
    offset_shape = tuple(shape[:2]) + (1,) * (len(shape) - 2)
    return noise + strength * randn(offset_shape, generator=generator, device=device, dtype=dtype)


def diffusion_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction: str = "eps", weighting: str = "uniform",
                   gamma: float = 5.0, offset_noise_strength: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Monte-Carlo estimate of the weighted denoising loss (Ho et al. 2020, Algorithm 1 / eq. 14).

    Samples ``t`` and noise, forms ``x_t`` (eq. 4), calls ``model_fn(x_t, t)`` (any callable: close over the
    conditioning), and returns ``mean_b w_b · mean(‖out_b - target_b‖²)`` in float32, plus detached
    diagnostics: ``t``, ``mse`` (per-sample, unweighted), ``weights`` and ``loss_unweighted``.
    """
    b = x0.shape[0]
    t = sample_timesteps(b, alphas_cumprod.shape[0], generator=generator, device=x0.device)
    noise = offset_noise(x0.shape, offset_noise_strength, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    out = model_fn(x_t, t)
    target = training_target(prediction, x0, noise, t, alphas_cumprod)
    mse = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    w = loss_weights(weighting, extract(snr(alphas_cumprod), t, 1), gamma, prediction)
    w = w.to(device=mse.device, dtype=mse.dtype)
    loss = (w * mse).mean()
    diag = {"t": t, "mse": mse.detach(), "weights": w, "loss_unweighted": mse.detach().mean()}
    return loss, diag
