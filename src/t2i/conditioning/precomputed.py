"""Text encodings precomputed into shards (``data_prep/encode_text.py``), so that a frozen text encoder
need not run during training (Imagen trains on precomputed T5-XXL states).

Each sample carries three derived keys, written by one frozen encoder:

- ``text_tokens.npy``: (L, D) float16 per-token states, L = the encoder's context length (padding rows
  included, masked out by ``text_mask``);
- ``text_mask.npy``: (L,) bool, True = real token (up to and including EOT);
- ``text_pooled.npy``: (Dp,) float32 pooled embedding.

`precomputed_text_condition` turns a batch of them into the `Cond` the encoder itself would have given
(cut after the batch's longest caption, as the tower is causal: padding never changes a real token's state).
"""

from __future__ import annotations

import torch

from t2i.conditioning.cond import Cond
from t2i.conditioning.text_encoding import TextEncoding

FIELDS = ("text_tokens.npy", "text_mask.npy", "text_pooled.npy")
KEYS = tuple(f.removesuffix(".npy") for f in FIELDS)


def has_precomputed_text(batch: dict) -> bool:
    present = [k for k in KEYS if k in batch]
    if present and len(present) != len(KEYS):
        raise ValueError(f"precomputed text needs all of {FIELDS} (data.array_fields), got only {present}")
    return bool(present)


def precomputed_text_condition(batch: dict, width: int, pooled_dim: int | None) -> Cond:
    """Cond(context, context_mask[, vector=pooled when ``pooled_dim``]) from a batch's precomputed keys,
    checked against the widths the network expects (states of another encoder are refused)."""
    tokens, mask, pooled = batch["text_tokens"], batch["text_mask"].bool(), batch["text_pooled"]
    if tokens.ndim != 3 or tokens.shape[-1] != width:
        raise ValueError(f"text_tokens of shape {tuple(tokens.shape)}: expected (B, L, {width}); were they "
                         f"written by another text encoder? (rerun data_prep/encode_text.py)")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"text_mask of shape {tuple(mask.shape)} != text_tokens' (B, L) {tuple(tokens.shape[:2])}")
    if pooled_dim is not None and (pooled.ndim != 2 or pooled.shape[-1] != pooled_dim):
        raise ValueError(f"text_pooled of shape {tuple(pooled.shape)}: expected (B, {pooled_dim}); were they "
                         f"written by another text encoder?")
    return TextEncoding(tokens.float(), mask, pooled.float()).to_cond(vector=pooled_dim is not None, cut=True)


def encode_for_shards(encoder: torch.nn.Module, captions: list[str]) -> dict:
    """The three derived arrays (numpy, one row per caption) of ``captions`` under a frozen ``encoder``."""
    with torch.no_grad():
        context, mask, pooled = encoder(list(captions))
    return {"text_tokens.npy": context.to(torch.float16).cpu().numpy(),
            "text_mask.npy": mask.bool().cpu().numpy(),
            "text_pooled.npy": pooled.float().cpu().numpy()}
