"""Transformer blocks for the diffusion UNet (Latent Diffusion's ``SpatialTransformer``).

Module layout and parameter names follow CompVis ``ldm/modules/attention.py`` (``to_q``/``to_k``/``to_v``
without bias, ``to_out.0``, GEGLU ``ff.net.0.proj`` / ``ff.net.2``, ``norm1..3``, ``proj_in``/``proj_out``)
so Stable Diffusion v1/v2 checkpoints map key by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nn.layers import group_norm


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key padding mask ``(B, L)`` -> additive bias ``(B, 1, 1, L)`` for ``scaled_dot_product_attention``.

    A bool mask means True = attend (keep), False = padding; a floating mask is taken as the bias itself.
    Masked keys get the dtype's most negative finite value rather than ``-inf`` so that a fully masked
    row yields a uniform average instead of NaNs.
    """
    if mask.ndim != 2:
        raise ValueError(f"context mask must have shape (batch, tokens), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias = bias.masked_fill(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    return bias[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) over ``context`` (B, L, context_dim).

    Self-attention when ``context`` is None. ``mask`` is an optional key padding mask for the context.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        b, n = q.shape[:2]
        if k.shape[0] != b:
            raise ValueError(f"context batch {k.shape[0]} does not match input batch {b}")

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        bias = None
        if mask is not None:
            if mask.shape != (b, k.shape[1]):
                raise ValueError(f"context mask shape {tuple(mask.shape)} != (batch, tokens) {(b, k.shape[1])}")
            bias = attention_bias(mask, q.dtype)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """``proj`` to twice the width, then ``value * gelu(gate)`` (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP: ``net.0`` GEGLU(dim, mult*dim), ``net.1`` dropout, ``net.2`` Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention (``attn1``), cross-attention (``attn2``), GEGLU MLP (``ff``).

    Without ``context_dim`` there is no cross-attention (no ``norm2``/``attn2``); with ``self_attention=False``
    no self-attention (no ``norm1``/``attn1``: Imagen's 256->1024 super-resolution model keeps only the text
    cross-attention, so that it can train on crops and sample at full size).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dropout: float = 0.0, self_attention: bool = True):
        super().__init__()
        if not self_attention and context_dim is None:
            raise ValueError("a transformer block needs self-attention or cross-attention (context_dim)")
        self.has_self_attention = self_attention
        if self_attention:
            self.norm1 = nn.LayerNorm(dim)
            self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.has_cross_attention = context_dim is not None
        if self.has_cross_attention:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.has_self_attention:
            x = x + self.attn1(self.norm1(x))
        if self.has_cross_attention:
            if context is None:
                raise ValueError("this block has cross-attention: a context is required")
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> ``depth`` transformer blocks -> feature map, with a residual connection.

    ``proj_in``/``proj_out`` are 1x1 convs (SD v1) or Linear layers (``use_linear_projection``, SD v2);
    ``proj_out`` is zero-initialised so the block starts as the identity.
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1,
                 context_dim: int | None = None, dropout: float = 0.0, use_linear_projection: bool = False,
                 num_groups: int = 32, self_attention: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, num_groups)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, self_attention) for _ in range(depth))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, -1)  # a view for channels_last inputs
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(b, height, width, -1).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return x + h
