"""What a diffusion stage trains its denoiser to do: the noise schedule, the prediction target and the loss
weighting, as one config-built part (``model.objective``) that the stage and its pipelines share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from t2i.diffusion.loss import WEIGHTINGS, diffusion_loss, loss_weights
from t2i.diffusion.parameterization import PREDICTIONS
from t2i.diffusion.schedule import make_schedule, snr


class DiffusionObjective(nn.Module):
    """The schedule ᾱ_t (``schedule``: `make_schedule`'s arguments), the network's ``prediction`` (eps, x0 or v),
    the per-timestep loss weighting (uniform, or Min-SNR-γ with ``min_snr_gamma``, optionally floored at
    ``min_snr_floor``) and offset noise.

    A module only so that ᾱ follows the stage to its device; it holds no state a checkpoint needs (ᾱ is rebuilt
    from the config). `loss` is a plain method, not ``forward``: a module call would put the whole loss, not
    the denoiser, under the hooks that count the network's FLOPs."""

    def __init__(self, schedule: dict | None = None, prediction: str = "eps", loss_weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, offset_noise: float = 0.0, min_snr_floor: float = 1.0):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.objective.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"model.objective.loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}")
        self.schedule = dict(schedule or {})
        self.register_buffer("alphas_cumprod", make_schedule(**self.schedule), persistent=False)
        # refuses a bad floor and an infinite weight now rather than at the first step
        loss_weights(loss_weighting, snr(self.alphas_cumprod), min_snr_gamma, prediction, min_snr_floor)
        self.prediction, self.loss_weighting = prediction, loss_weighting
        self.min_snr_gamma, self.offset_noise, self.min_snr_floor = min_snr_gamma, offset_noise, min_snr_floor

    def loss(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`diffusion_loss` of ``denoise(x_t, t)`` (the conditioning closed over) on the clean batch ``x0``."""
        return diffusion_loss(denoise, x0, self.alphas_cumprod, self.prediction, self.loss_weighting,
                              self.min_snr_gamma, self.offset_noise, self.min_snr_floor, generator=generator)
