"""Sinusoidal timestep / noise-level embeddings and the MLP that lifts them to the UNet embedding width.

Follows CompVis ``ldm/modules/diffusionmodules/util.py::timestep_embedding`` (``cos`` first, frequencies
``exp(-log(max_period) * i / half)``), which is also diffusers' ``flip_sin_to_cos=True, freq_shift=0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor | float, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True) -> torch.Tensor:
    """Sinusoidal embedding ``(N, dim)`` (float32) of timesteps ``t`` of shape ``(N,)`` or a scalar.

    ``t`` may be fractional (continuous-time noise levels such as ``log(sigma) / 4`` or ``1000 * t``).
    With ``flip_sin_to_cos`` the cosine half comes first (CompVis / SD layout); odd ``dim`` is zero padded.
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or a 1-D tensor, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Sequential):
    """``Linear -> SiLU -> Linear``; as an ``nn.Sequential`` its parameters are named ``0.*`` and ``2.*``
    (CompVis ``time_embed.0`` / ``time_embed.2`` and SD-XL ``label_emb.0.0`` / ``label_emb.0.2``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.in_dim, self.out_dim = in_dim, out_dim
