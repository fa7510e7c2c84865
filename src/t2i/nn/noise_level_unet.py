"""A super-resolution UNet told how its low-resolution input was degraded (CDM / Imagen noise-conditioning
augmentation, unCLIP's blurred low-res input): each degradation level is embedded sinusoidally, like a
timestep, and the concatenation goes through the UNet's vector path into the timestep embedding.

A text-conditioned one (Imagen's SR stages) also has cross-attention on the caption's token states and, with
``pool_context``, their masked mean projected and added to that vector (Imagen adds a pooled text embedding
to the timestep embedding at every stage)."""

from __future__ import annotations

import torch
from torch import nn

from t2i.nn.embeddings import timestep_embedding
from t2i.nn.unet import UNet, UNetWrapper


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) tokens -> (B, D): the mean over real tokens (all of them without a mask)."""
    if mask is None:
        return context.mean(1)
    weights = mask.to(context.dtype).unsqueeze(-1)
    return (context * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class NoiseLevelUNet(UNetWrapper):
    """``forward(x, t, concat=low-res image, vector=levels (B, num_levels)[, context, context_mask])``; the
    UNet's ``vector_dim`` must be ``num_levels * level_embed_dim``. ``level_scale`` maps a level (noise level
    in [0, 1], blur sigma in pixels) to the sinusoid's "timestep" argument. Text tokens (``context``) are
    required exactly when the UNet has cross-attention (``context_dim``)."""

    def __init__(self, unet: UNet, num_levels: int = 2, level_scale: float = 1000.0, pool_context: bool = False):
        super().__init__()
        if num_levels < 1 or not unet.vector_dim or unet.vector_dim % num_levels:
            raise ValueError(f"the UNet's vector_dim ({unet.vector_dim}) must be a positive multiple of "
                             f"num_levels ({num_levels})")
        if not unet.concat_channels:
            raise ValueError("a super-resolution UNet needs concat_channels (the low-res image)")
        if pool_context and unet.context_dim is None:
            raise ValueError("pool_context needs a UNet with cross-attention (context_dim)")
        self.unet, self.num_levels, self.level_scale = unet, num_levels, level_scale
        self.level_embed_dim = unet.vector_dim // num_levels
        self.context_pool = nn.Linear(unet.context_dim, unet.vector_dim) if pool_context else None

    @property
    def context_dim(self) -> int | None:
        return self.unet.context_dim

    def level_embedding(self, levels: torch.Tensor) -> torch.Tensor:
        if levels.ndim != 2 or levels.shape[1] != self.num_levels:
            raise ValueError(f"levels must be (B, {self.num_levels}), got {tuple(levels.shape)}")
        return torch.cat([timestep_embedding(levels[:, i] * self.level_scale, self.level_embed_dim)
                          for i in range(self.num_levels)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, vector: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        if vector is None:
            raise ValueError(f"the degradation levels (vector, (B, {self.num_levels})) are required")
        embedding = self.level_embedding(vector.float())
        if self.context_pool is not None and context is not None:
            embedding = embedding + self.context_pool(masked_mean(context.to(embedding.dtype), context_mask))
        return self.unet(x, t, context=context, context_mask=context_mask, vector=embedding, concat=concat)
