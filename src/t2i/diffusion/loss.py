"""The denoising training loss: timestep/noise sampling, Min-SNR-γ weightings, offset noise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2i.diffusion.parameterization import PREDICTIONS, q_sample, training_target
from t2i.diffusion.schedule import extract, snr
from t2i.diffusion.seeded_random import randint, randn

WEIGHTINGS = ("uniform", "min_snr", "truncated_min_snr")


def loss_weights(kind: str, snr_t: torch.Tensor, gamma: float = 5.0, prediction: str = "eps",
                 floor: float = 1.0) -> torch.Tensor:
    """Per-sample loss weights for an MSE on ``prediction``'s target.

    Each kind is an x0-space weight w(SNR) (the weight on ‖x0 - x̂0‖²), rewritten for the target actually
    regressed: ε → w/SNR, x0 → w, v → w/(SNR + 1).

    - "uniform": all ones on the prediction's own target (the "simple" loss of Ho et al. 2020, eq. 14); in x0 space
      SNR for ε and SNR + 1 for v.
    - "min_snr": Min-SNR-γ (Hang et al. 2023, eq. 9 and §3.4), w = min(SNR, γ). The ε weight is evaluated as
      min(1, γ/SNR), which is 1 (not NaN) at SNR = 0.
    - "truncated_min_snr": w = clamp(SNR, floor, γ): Min-SNR-γ's cap on the nearly clean timesteps, and a floor
      on the noisiest (floor 1 is Salimans & Ho's truncated SNR, max(SNR, 1), 2022 §4). Min-SNR alone weighs a
      timestep with SNR < 1 by its SNR (0.005 at t = T on the linear schedule), and that is where the layout,
      which no part of a very noisy image shows, has to be read from the text (docs/imagen.md). With ε at SNR = 0
      its weight is infinite: refused.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if kind not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")
    if kind == "uniform":
        return torch.ones_like(snr_t)
    if kind == "min_snr" and prediction == "eps":
        return (gamma / snr_t).clamp(max=1.0)
    if kind == "truncated_min_snr" and not 0 < floor <= gamma:
        raise ValueError(f"the truncated Min-SNR floor must be in (0, gamma={gamma}], got {floor}")
    w = snr_t.clamp(max=gamma) if kind == "min_snr" else snr_t.clamp(min=floor, max=gamma)
    if prediction == "eps":
        if bool((snr_t == 0).any()):
            raise ValueError("truncated_min_snr with eps-prediction has an infinite weight at SNR = 0 (a zero "
                             "terminal SNR schedule): use v-prediction")
        return w / snr_t
    if prediction == "x0":
        return w
    return w / (snr_t + 1)


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
                   gamma: float = 5.0, offset_noise_strength: float = 0.0, snr_floor: float = 1.0,
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
    w = loss_weights(weighting, extract(snr(alphas_cumprod), t, 1), gamma, prediction, snr_floor)
    w = w.to(device=mse.device, dtype=mse.dtype)
    loss = (w * mse).mean()
    diag = {"t": t, "mse": mse.detach(), "weights": w, "loss_unweighted": mse.detach().mean()}
    return loss, diag
