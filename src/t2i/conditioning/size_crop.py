"""SDXL's micro-conditioning (Podell et al. 2023, §2.2): the image's original size, the top-left corner of the crop
that was kept, and the target size, given to the network so that it learns what cropping and upscaling look like,
and is asked at sampling for an uncropped image of the size it draws (original = target, crop (0, 0)).

Each of the six numbers ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` (diffusers' ``time_ids``
order) gets a sinusoidal embedding of ``dim`` features (cosine half first, as diffusers' ``Timesteps(dim,
flip_sin_to_cos=True, downscale_freq_shift=0)``); the six are concatenated after the pooled text embedding into
the UNet's conditioning vector, which its ``label_emb`` MLP adds to the time embedding: the layout of diffusers'
``addition_embed_type="text_time"`` (``add_embedding``), with ``projection_class_embeddings_input_dim =
pooled + 6 * dim``.
"""

from __future__ import annotations

import torch

from t2i.conditioning.cond import Cond
from t2i.nn.embeddings import timestep_embedding

BATCH_KEYS = ("original_size", "crop_top_left")  # (B, 2) each, (h, w) and (top, left), from the data stream
NUMBERS = 6


def size_crop_ids(n: int, target_size: tuple[int, int], original_size: torch.Tensor | None = None,
                  crop_top_left: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """(n, 6) float ids. Missing sizes default to the sampling request: original = target, crop (0, 0)."""
    target = torch.tensor([list(target_size)] * n, dtype=torch.float32, device=device)
    original = target if original_size is None else torch.as_tensor(original_size, device=device).float()
    crop = torch.zeros_like(target) if crop_top_left is None else torch.as_tensor(crop_top_left, device=device).float()
    for name, value in (("original_size", original), ("crop_top_left", crop)):
        if value.shape != (n, 2):
            raise ValueError(f"{name} of shape {tuple(value.shape)}, expected ({n}, 2)")
    return torch.cat([original, crop, target], dim=1)


def size_crop_embedding(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 6) ids -> (B, 6 * dim): each number's sinusoidal embedding, concatenated in order."""
    if ids.ndim != 2 or ids.shape[1] != NUMBERS:
        raise ValueError(f"size/crop ids of shape {tuple(ids.shape)}, expected (B, {NUMBERS})")
    return timestep_embedding(ids.flatten(), dim).reshape(ids.shape[0], NUMBERS * dim)


def with_size_crop(cond: Cond, ids: torch.Tensor, dim: int) -> Cond:
    """``cond`` with the size/crop embedding of ``ids`` appended to its vector (or as its vector)."""
    sizes = size_crop_embedding(ids, dim).to(ids.device if cond.vector is None else cond.vector.device)
    return cond.replace(vector=sizes if cond.vector is None else torch.cat([cond.vector, sizes], dim=1))


def takes_pooled(vector_dim: int | None, size_dim: int, pooled_dim: int | None) -> bool:
    """Whether a UNet's conditioning vector starts with the pooled text embedding, given that its last
    ``6 * size_dim`` features are the size/crop embedding; a vector of any other width is refused."""
    vector_dim, rest = vector_dim or 0, (vector_dim or 0) - NUMBERS * size_dim
    if size_dim and rest not in (0, pooled_dim):
        raise ValueError(f"incompatible input: the UNet's vector_dim {vector_dim} must be 6 x {size_dim} (the "
                         f"size/crop embedding) or that plus the text encoder's pooled {pooled_dim}")
    return rest > 0
