"""Peak signal-to-noise ratio, the one definition the VAE's validation, the evaluation reports and the tests use."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, per_image: bool = True) -> torch.Tensor:
    """PSNR in dB between two (B, C, H, W) image batches: one value per image (B,), or with ``per_image=False``
    one value from the whole batch's mean squared error (a scalar). ``inf`` where the images are identical; the
    default ``data_range`` is for [-1, 1] images."""
    squared = (x.float() - y.float()).pow(2)
    mse = squared.flatten(1).mean(dim=1) if per_image else squared.mean()
    return 10.0 * torch.log10(data_range**2 / mse)
