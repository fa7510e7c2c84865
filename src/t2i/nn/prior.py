"""The unCLIP diffusion prior (Ramesh et al. 2022, sec. 2.1): a causal transformer that denoises a CLIP
image embedding given the caption.

Sequence, in order (DALL-E 2's decoder-only prior):

    [text tokens (L, masked where padding), text embedding, timestep embedding, noised image embedding, query]

Every position attends causally (to itself and earlier positions) and never to padded text tokens; the
output is read at the last position (the learned query) and projected to the embedding width. The
network predicts x0, the clean (normalised and scaled) image embedding.

``forward(x, t, context, context_mask, vector)`` has the UNet's keyword interface, so the one diffusion
training path, the samplers and classifier-free guidance (``Cond(context, context_mask, vector)``) drive
it unchanged: ``context`` = text token states, ``vector`` = the caption's CLIP text embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nn.embeddings import TimestepEmbedding, timestep_embedding

NUM_TRAILING = 4  # text embedding, timestep, noised image embedding, query


def prior_attention_mask(context_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) text mask -> (B, S, S) bool, True = may attend, for S = L + 4 positions: causal, and padded
    text tokens are never attended to (a padded query row still sees the non-padded positions before it)."""
    b, length = context_mask.shape
    size = length + NUM_TRAILING
    causal = torch.ones(size, size, dtype=torch.bool, device=context_mask.device).tril()
    keys = torch.cat([context_mask.bool(), context_mask.new_ones(b, NUM_TRAILING, dtype=torch.bool)], dim=1)
    mask = causal[None] & keys[:, None, :]
    return mask | torch.eye(size, dtype=torch.bool, device=mask.device)[None]  # every row attends somewhere


class PriorBlock(nn.Module):
    """Pre-norm transformer block: masked self-attention (SDPA) and a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(h.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.norm2(x))


class PriorTransformer(nn.Module):
    """Denoiser of CLIP image embeddings ``(B, embed_dim)``; see the module docstring.

    ``text_width``: width of the text token states (the CLIP text tower's); ``max_text_tokens`` bounds L.
    Learned positions: text token i at i, the 4 trailing tokens always at ``max_text_tokens + j``, so a
    batch may trim its padding (any L) without moving them. ``vector`` is the caption's CLIP text embedding
    (``embed_dim`` wide).
    """

    def __init__(self, embed_dim: int, text_width: int, width: int = 512, layers: int = 6, heads: int = 8,
                 max_text_tokens: int = 77, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.text_width, self.width = embed_dim, text_width, width
        self.max_text_tokens = max_text_tokens
        self.text_proj = nn.Linear(text_width, width)
        self.text_embed_proj = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width, width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(max_text_tokens + NUM_TRAILING, width) * 0.01)
        self.blocks = nn.ModuleList(PriorBlock(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)

    def tokens(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
               vector: torch.Tensor) -> torch.Tensor:
        """The (B, L + 4, width) input sequence, before positional embeddings."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        dtype = self.x_proj.weight.dtype
        time = self.time_embed(timestep_embedding(t, self.width).to(dtype))
        trailing = torch.stack([self.text_embed_proj(vector.to(dtype)), time, self.x_proj(x.to(dtype)),
                                self.query.to(dtype).expand(b, -1)], dim=1)
        return torch.cat([self.text_proj(context.to(dtype)), trailing], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, vector: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"x must be (B, {self.embed_dim}) image embeddings, got {tuple(x.shape)}")
        if context is None or context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.text_width:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context of shape (B={b}, L, {self.text_width}) text token states is required, "
                             f"got {got}")
        if context.shape[1] > self.max_text_tokens:
            raise ValueError(f"{context.shape[1]} text tokens > max_text_tokens={self.max_text_tokens}")
        if vector is None or vector.shape != (b, self.embed_dim):
            got = None if vector is None else tuple(vector.shape)
            raise ValueError(f"vector (the text embedding) of shape {(b, self.embed_dim)} is required, got {got}")
        if concat is not None:
            raise ValueError("the prior takes no concat input")
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        h = self.tokens(x, t, context, vector)
        pos = self.positional_embedding  # text tokens at 0..L-1; the 4 trailing tokens at fixed positions
        h = h + torch.cat([pos[: context.shape[1]], pos[self.max_text_tokens:]]).to(h.dtype)
        mask = prior_attention_mask(context_mask)
        for block in self.blocks:
            h = block(h, mask)
        return self.out_proj(self.final_norm(h[:, -1]))
