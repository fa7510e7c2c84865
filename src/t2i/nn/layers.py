"""Small shared building blocks for the networks in :mod:`t2i.nn`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def num_groups_for(channels: int, num_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is ``<= num_groups`` (so tiny test models still work)."""
    if channels <= 0 or num_groups <= 0:
        raise ValueError(f"channels and num_groups must be positive, got {channels} and {num_groups}")
    for groups in range(min(num_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable: 1 always divides


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-6, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with LDM defaults (32 groups, eps 1e-6); the group count adapts to small ``channels``."""
    return nn.GroupNorm(num_groups_for(channels, num_groups), channels, eps=eps, affine=affine)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 ``conv`` (the VAE decoder's and the UNet's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): each pixel's (y, x) centre in [-1, 1] (CoordConv input channels, Liu et al. 2018)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
    return grid[None].expand(b, -1, -1, -1)
