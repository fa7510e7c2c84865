"""A text encoder's output and its one conversion into the denoisers' `Cond`.

Every text encoder (the OpenCLIP towers, trained or frozen, and states precomputed into shards) gives
``TextEncoding(context (B, L, D), mask (B, L) bool, pooled (B, Dp))``. :meth:`TextEncoding.to_cond` is where
captions become conditioning: token states and mask for cross-attention and, when the network takes a global
vector, the pooled embedding. This module imports no open_clip, so data tools and stages can use it cheaply.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from t2i.conditioning.cond import Cond


class TextEncoding(NamedTuple):
    context: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, Dp)

    def to_cond(self, vector: bool = False, cut: bool = False) -> Cond:
        """``Cond(context, context_mask[, vector=pooled])``. ``cut`` drops the positions after the batch's
        longest caption: the towers are causal, so a real token's state never depends on the padding, and
        later networks attend to less of it."""
        context, mask = self.context, self.mask
        if cut:
            length = max(int(mask.sum(1).max()), 1)
            context, mask = context[:, :length], mask[:, :length]
        return Cond(context=context, context_mask=mask, vector=self.pooled if vector else None)


def text_condition(net: nn.ModuleDict, frozen_text_encoder: nn.Module | None, captions: list[str],
                   pooled: bool | None = None) -> Cond:
    """Captions -> ``Cond`` through the stage's text encoder: ``net["text_encoder"]`` when it is trained with
    the denoiser, else the frozen one (no graph kept); the pooled vector when ``pooled`` (by default: when the
    denoiser takes a vector)."""
    encoder = net["text_encoder"] if "text_encoder" in net else frozen_text_encoder  # noqa: SIM401
    if encoder is None:
        return Cond()
    with torch.no_grad() if encoder is frozen_text_encoder else contextlib.nullcontext():
        encoding = TextEncoding(*encoder(captions))
    if pooled is None:
        pooled = bool(getattr(net["denoiser"], "vector_dim", None))
    return encoding.to_cond(vector=pooled)


@torch.no_grad()
def clip_text_condition(text_encoder: nn.Module, prompts: list[str]) -> tuple[Cond, torch.Tensor]:
    """Captions -> (``Cond`` of the frozen CLIP text tower's token states, cut after the longest caption;
    unit CLIP text embeddings (B, D)): the unCLIP prior's and decoder's text conditioning."""
    encoding = TextEncoding(*text_encoder(list(prompts)))
    return encoding.to_cond(cut=True), F.normalize(encoding.pooled.float(), dim=-1)
