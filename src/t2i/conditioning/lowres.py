"""The low-resolution input of a super-resolution stage, and how it is degraded in training.

- ``downsample``: the high-res image -> the low-res one (bicubic, antialiased), as the stage below would
  have produced it;
- ``gaussian_blur``: per-sample sigma (unCLIP's upsamplers; CDM's blur augmentation at high resolution);
- ``noise_augment``: per-sample noise level ``s`` in [0, 1], ``z = cos(πs/2)·x + sin(πs/2)·ε`` (CDM /
  Imagen noise-conditioning augmentation; s = 0 is the clean image).

``LowResDegradation`` draws the levels in training (each with its own probability and range) and uses
the FIXED sampling levels otherwise; it always returns the levels too, which the network is given
(``NoiseLevelUNet``): ``levels[:, 0]`` = noise level, ``levels[:, 1]`` = blur sigma in low-res pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.diffusion.seeded_random import randn


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Per-sample separable Gaussian blur, reflect padding; sigma (B,) in pixels (0 = unchanged)."""
    b, c, h, w = images.shape
    sigma = sigma.to(images.device, torch.float32).reshape(b)
    radius = radius if radius is not None else max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, h - 1, w - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets[None] == 0).float())
    kernel = kernel / kernel.sum(-1, keepdim=True)  # (B, K)
    x = images.float().reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w).to(images.dtype)


def noise_augment(images: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``cos(πs/2)·x + sin(πs/2)·ε`` per sample, s = level (B,) in [0, 1]."""
    angle = level.to(images.device, torch.float32).reshape(-1, 1, 1, 1) * (math.pi / 2)
    return (torch.cos(angle) * images.float() + torch.sin(angle) * noise.float()).to(images.dtype)


class LowResDegradation(nn.Module):
    """Degrade the low-res conditioning image: random levels in training, fixed levels at sampling.

    Training: with probability ``blur_prob`` a sigma ~ U(``blur_sigma``), else 0; with probability
    ``noise_prob`` a noise level ~ U(``noise_level``), else 0. Sampling (``self.training`` False): noise
    level ``sample_noise_level`` (0 = clean; Imagen uses ~0.2) and no blur.
    """

    NUM_LEVELS = 2

    def __init__(self, blur_prob: float = 0.0, blur_sigma: tuple[float, float] = (0.4, 0.6),
                 noise_prob: float = 0.0, noise_level: tuple[float, float] = (0.0, 0.5),
                 sample_noise_level: float = 0.0):
        super().__init__()
        for name, p in (("blur_prob", blur_prob), ("noise_prob", noise_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        blur_sigma, noise_level = tuple(float(v) for v in blur_sigma), tuple(float(v) for v in noise_level)
        if len(blur_sigma) != 2 or not 0.0 <= blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be a range [lo, hi] with 0 <= lo <= hi, got {blur_sigma}")
        if len(noise_level) != 2 or not 0.0 <= noise_level[0] <= noise_level[1] <= 1.0:
            raise ValueError(f"noise_level must be a range within [0, 1], got {noise_level}")
        if not 0.0 <= sample_noise_level <= 1.0:
            raise ValueError(f"sample_noise_level must be in [0, 1], got {sample_noise_level}")
        self.blur_prob, self.blur_sigma = blur_prob, blur_sigma
        self.noise_prob, self.noise_level, self.sample_noise_level = noise_prob, noise_level, sample_noise_level

    def draw_levels(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 2) [noise level, blur sigma] for a training batch."""
        rng_device = generator.device if generator is not None else "cpu"
        u = torch.rand((4, batch), generator=generator, device=rng_device).to(device)
        noise = torch.where(u[0] < self.noise_prob,
                            self.noise_level[0] + u[1] * (self.noise_level[1] - self.noise_level[0]), 0.0)
        blur = torch.where(u[2] < self.blur_prob,
                           self.blur_sigma[0] + u[3] * (self.blur_sigma[1] - self.blur_sigma[0]), 0.0)
        return torch.stack([noise, blur], dim=1)

    def sampling_levels(self, batch: int, device, noise_level: float | None = None) -> torch.Tensor:
        level = self.sample_noise_level if noise_level is None else float(noise_level)
        return torch.tensor([level, 0.0], device=device).expand(batch, 2).clone()

    def forward(self, low: torch.Tensor, generator: torch.Generator | None = None,
                noise_level: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(degraded low-res image, levels (B, 2)); ``noise_level`` replaces ``sample_noise_level`` at sampling."""
        b = low.shape[0]
        levels = (self.draw_levels(b, low.device, generator) if self.training
                  else self.sampling_levels(b, low.device, noise_level))
        out = low
        if bool((levels[:, 1] > 0).any()):
            out = gaussian_blur(out, levels[:, 1])
        if bool((levels[:, 0] > 0).any()):
            out = noise_augment(out, levels[:, 0], randn(out.shape, generator=generator, device=out.device,
                                                         dtype=out.dtype))
        return out, levels

    def extra_repr(self) -> str:
        return (f"blur_prob={self.blur_prob}, blur_sigma={self.blur_sigma}, noise_prob={self.noise_prob}, "
                f"noise_level={self.noise_level}, sample_noise_level={self.sample_noise_level}")
