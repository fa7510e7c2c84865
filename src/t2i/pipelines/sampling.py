"""Sampling a conditional diffusion network: the one place that turns (network, conditioning,
guidance, thresholding, sampler settings) into samples. Stages (sample grids) and pipelines share it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.diffusion import classifier_free_guidance, ddim_sample, ddpm_sample, thresholded, to_x0_eps
from t2i.diffusion.parameterization import X0Fn


@dataclass
class SamplerSettings:
    steps: int = 50
    eta: float = 0.0  # 0: DDIM (deterministic); 1 with all steps: DDPM
    guidance_scale: float = 3.0
    sampler: str = "ddim"  # ddim | ddpm
    thresholding: str = "none"  # none | static | dynamic (pixel space)
    percentile: float = 0.95  # dynamic thresholding percentile (imagen-pytorch's default, as DESIGN.md)
    spacing: str = "leading"


def denoiser(network: nn.Module, alphas_cumprod: torch.Tensor, prediction: str, cond: Cond,
             uncond: Cond | None, settings: SamplerSettings, x0_wrapper: Callable[[X0Fn], X0Fn] | None = None):
    """x0_fn(x_t, t) for the samplers: the network under classifier-free guidance (cond and uncond in one
    batched call) converted to x̂0, then ``x0_wrapper`` (e.g. classifier guidance, which shifts x̂0 and so
    must come before the threshold), then thresholded."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
        return network(x, t, **c.as_kwargs()).float()

    use_cfg = uncond is not None and settings.guidance_scale != 1.0
    guided = classifier_free_guidance(model_fn, settings.guidance_scale if use_cfg else 1.0)

    def x0_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = guided(x_t, t, cond, uncond)
        return to_x0_eps(prediction, out, x_t, t, alphas_cumprod)[0]

    return thresholded(x0_wrapper(x0_fn) if x0_wrapper is not None else x0_fn, settings.thresholding,
                       settings.percentile)


@torch.no_grad()
def sample(network: nn.Module, alphas_cumprod: torch.Tensor, prediction: str, shape: tuple[int, ...],
           cond: Cond, uncond: Cond | None, settings: SamplerSettings, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None, x0_wrapper: Callable[[X0Fn], X0Fn] | None = None) -> torch.Tensor:
    """Draw samples of `shape` (batch first) given `cond`; `noise` (x_T) overrides the generator;
    `x0_wrapper` wraps the guided x̂0 before thresholding (see `denoiser`)."""
    device = next(network.parameters()).device
    ac = alphas_cumprod.to(device)
    x0_fn = denoiser(network, ac, prediction, cond, uncond, settings, x0_wrapper)
    start = noise.to(device) if noise is not None else shape
    if settings.sampler == "ddim":
        return ddim_sample(x0_fn, start, ac, steps=settings.steps, eta=settings.eta, generator=generator,
                           spacing=settings.spacing, device=device)
    if settings.sampler == "ddpm":
        steps = None if settings.steps >= ac.shape[0] else settings.steps
        return ddpm_sample(x0_fn, start, ac, steps=steps, generator=generator, spacing=settings.spacing,
                           device=device)
    raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {settings.sampler!r}")
