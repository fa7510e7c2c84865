"""The unCLIP decoder network (Ramesh et al. 2022, sec. 2.2): the shared UNet conditioned on a CLIP image
embedding, which is both projected and added to the timestep embedding (the UNet's vector path) and
projected into ``num_image_tokens`` (4) extra context tokens concatenated beside the caption's text tokens.

``coordinate_channels=True`` feeds two extra input channels holding each pixel's (y, x) in [-1, 1]
(CoordConv, Liu et al. 2018) through the UNet's concat input: convolutions alone see absolute position only
through the zero padding at the border, and a decoder must place what the embedding describes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from t2i.nn.layers import coordinate_grid
from t2i.nn.unet import UNet, UNetWrapper

__all__ = ["ImageEmbeddingUNet", "coordinate_grid"]


class ImageEmbeddingUNet(UNetWrapper):
    """``forward(x, t, context=text tokens (B, L, text_width) | None, context_mask, vector=CLIP image
    embedding (B, embed_dim), concat)``. The embedding is expected L2-normalised (as data_prep/embed_clip.py
    writes it) and is scaled by ``sqrt(embed_dim)`` inside. ``text_width=None`` builds a decoder without
    text tokens (image embedding only)."""

    def __init__(self, unet: UNet, embed_dim: int, text_width: int | None = None, num_image_tokens: int = 4,
                 coordinate_channels: bool = False):
        super().__init__()
        if unet.concat_channels != (2 if coordinate_channels else 0):
            raise ValueError(f"the UNet's concat_channels must be {2 if coordinate_channels else 0} "
                             f"(coordinate_channels={coordinate_channels}), got {unet.concat_channels}")
        self.coordinate_channels = coordinate_channels
        if unet.vector_dim != embed_dim:
            raise ValueError(f"the UNet's vector_dim ({unet.vector_dim}) must equal the CLIP embed_dim ({embed_dim})")
        if unet.context_dim is None:
            raise ValueError("the decoder UNet needs cross-attention (context_dim) for the image tokens")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.unet, self.embed_dim, self.num_image_tokens = unet, embed_dim, num_image_tokens
        self.text_width = text_width
        width = unet.context_dim
        self.image_tokens = nn.Linear(embed_dim, num_image_tokens * width)
        self.text_proj = nn.Linear(text_width, width) if text_width else None

    # what the stage checks inputs against
    @property
    def context_dim(self) -> int | None:
        return self.text_width

    @property
    def vector_dim(self) -> int:
        return self.embed_dim

    def context_tokens(self, image_embed: torch.Tensor, context: torch.Tensor | None,
                       context_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4 + L, width) tokens [image tokens, projected text tokens] and their (B, 4 + L) mask."""
        b = image_embed.shape[0]
        tokens = self.image_tokens(image_embed).reshape(b, self.num_image_tokens, -1)
        mask = torch.ones(b, self.num_image_tokens, dtype=torch.bool, device=tokens.device)
        if self.text_proj is None:
            if context is not None:
                raise ValueError("this decoder takes no text tokens (text_width=None) but a context was given")
            return tokens, mask
        if context is None or context.shape[-1] != self.text_width:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"text tokens of shape (B, L, {self.text_width}) are required, got {got}")
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        text = self.text_proj(context.to(tokens.dtype))
        return torch.cat([tokens, text], dim=1), torch.cat([mask, context_mask.bool()], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, vector: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        if vector is None or vector.shape != (x.shape[0], self.embed_dim):
            got = None if vector is None else tuple(vector.shape)
            raise ValueError(f"the CLIP image embedding (vector) of shape {(x.shape[0], self.embed_dim)} is "
                             f"required, got {got}")
        if concat is not None:
            raise ValueError("the decoder takes no concat input")
        embed = vector.to(self.image_tokens.weight.dtype) * math.sqrt(self.embed_dim)
        tokens, mask = self.context_tokens(embed, context, context_mask)
        if self.coordinate_channels:
            concat = coordinate_grid(x)
        return self.unet(x, t, context=tokens, context_mask=mask, vector=embed, concat=concat)

