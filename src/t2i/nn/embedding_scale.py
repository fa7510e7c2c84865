"""The unCLIP prior's target space: CLIP image embeddings, L2-normalised, then scaled.

Two choices (Ramesh et al. 2022; DALLE2-pytorch ``image_embed_scale``):

- ``"sqrt_dim"``: ``x = e / |e| * sqrt(D)``, unit variance per coordinate for an isotropic embedding;
- ``"dataset"``: ``x = (e / |e| - mean) / std`` per coordinate, with ``mean``/``std`` measured on the
  training data (``fit``) and stored as buffers, so the export carries them.

``decode`` inverts the map and re-normalises, so sampled embeddings are unit vectors again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("sqrt_dim", "dataset")


class EmbeddingScale(nn.Module):
    def __init__(self, embed_dim: int, mode: str = "sqrt_dim", eps: float = 1e-6):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.embed_dim, self.mode, self.eps = embed_dim, mode, eps
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("std", torch.full((embed_dim,), 1.0 / math.sqrt(embed_dim)))
        self.register_buffer("fitted", torch.tensor(mode == "sqrt_dim"))

    @property
    def needs_fit(self) -> bool:
        return not bool(self.fitted)

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """Measure the per-coordinate mean/std of normalised embeddings (N, D) ("dataset" mode)."""
        if self.mode != "dataset":
            return
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim or embeddings.shape[0] < 2:
            raise ValueError(f"fit needs (N >= 2, {self.embed_dim}) embeddings, got {tuple(embeddings.shape)}")
        unit = F.normalize(embeddings.float(), dim=-1)
        self.mean.copy_(unit.mean(0))
        self.std.copy_(unit.std(0).clamp_min(self.eps))
        self.fitted.fill_(True)

    def _check(self, e: torch.Tensor) -> None:
        if e.ndim != 2 or e.shape[1] != self.embed_dim:
            raise ValueError(f"expected (B, {self.embed_dim}) embeddings, got {tuple(e.shape)}")
        if self.needs_fit:
            raise RuntimeError("EmbeddingScale(mode='dataset') used before fit(): measure the training data first")

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        """Raw or unit embeddings -> the diffusion target space."""
        self._check(e)
        unit = F.normalize(e.float(), dim=-1)
        if self.mode == "sqrt_dim":
            return unit * math.sqrt(self.embed_dim)
        return (unit - self.mean) / self.std

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Target space -> unit embeddings."""
        self._check(x)
        e = x.float() / math.sqrt(self.embed_dim) if self.mode == "sqrt_dim" else x.float() * self.std + self.mean
        return F.normalize(e, dim=-1)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, mode={self.mode!r}"
