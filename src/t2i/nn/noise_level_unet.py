"""A super-resolution UNet told how its low-resolution input was degraded (CDM / Imagen noise-conditioning
augmentation, unCLIP's blurred low-res input): each degradation level is embedded sinusoidally, like a
timestep, and the concatenation goes through the UNet's vector path into the timestep embedding."""

from __future__ import annotations

import torch

from t2i.nn.embeddings import timestep_embedding
from t2i.nn.unet import UNet, UNetWrapper


class NoiseLevelUNet(UNetWrapper):
    """``forward(x, t, concat=low-res image, vector=levels (B, num_levels))``; the UNet's ``vector_dim`` must
    be ``num_levels * level_embed_dim``. ``level_scale`` maps a level (noise level in [0, 1], blur sigma
    in pixels) to the sinusoid's "timestep" argument. No text here: ``context`` must be None unless the UNet
    has cross-attention (then it is passed through)."""

    def __init__(self, unet: UNet, num_levels: int = 2, level_scale: float = 1000.0):
        super().__init__()
        if num_levels < 1 or not unet.vector_dim or unet.vector_dim % num_levels:
            raise ValueError(f"the UNet's vector_dim ({unet.vector_dim}) must be a positive multiple of "
                             f"num_levels ({num_levels})")
        if not unet.concat_channels:
            raise ValueError("a super-resolution UNet needs concat_channels (the low-res image)")
        self.unet, self.num_levels, self.level_scale = unet, num_levels, level_scale
        self.level_embed_dim = unet.vector_dim // num_levels

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
        return self.unet(x, t, context=context, context_mask=context_mask,
                         vector=self.level_embedding(vector.float()), concat=concat)
