"""`Cond`: the typed conditioning a denoiser receives.

One dataclass carries every kind of conditioning the UNet accepts, batch-first:

- ``context`` (B, L, D): per-token states (text encoder hidden states) for cross-attention;
- ``context_mask`` (B, L) bool, True = real token (keys where it is False are not attended);
- ``vector`` (B, Dv): a global vector (pooled text embedding, class embedding, CLIP image embedding),
  added to the timestep embedding;
- ``concat`` (B, C, H, W): an image concatenated to the noisy input channels (the low-resolution image
  of a super-resolution model).

Any field may be None. ``unet(x, t, **cond.as_kwargs())`` is the same as
``unet(x, t, context=c.context, context_mask=c.context_mask, vector=c.vector, concat=c.concat)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

FIELDS = ("context", "context_mask", "vector", "concat")
_NDIM = {"context": 3, "context_mask": 2, "vector": 2, "concat": 4}


@dataclass
class Cond:
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    vector: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def __post_init__(self):
        sizes = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"Cond.{name} must be a tensor or None, got {type(value).__name__}")
            if value.ndim != _NDIM[name]:
                raise ValueError(f"Cond.{name} must have {_NDIM[name]} dims, got shape {tuple(value.shape)}")
            sizes[name] = value.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Cond fields disagree on the batch size: {sizes}")
        if self.context_mask is not None:
            if self.context is None:
                raise ValueError("Cond.context_mask given without context")
            if self.context_mask.dtype != torch.bool:
                raise TypeError(f"Cond.context_mask must be bool (True = real token), got {self.context_mask.dtype}")
            if self.context_mask.shape != self.context.shape[:2]:
                raise ValueError(f"Cond.context_mask shape {tuple(self.context_mask.shape)} != context's (B, L) "
                                 f"{tuple(self.context.shape[:2])}")

    # ------------------------------------------------------------------ accessors
    @property
    def batch_size(self) -> int | None:
        """B, or None when every field is None (an unconditional model)."""
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                return value.shape[0]
        return None

    @property
    def device(self) -> torch.device | None:
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                return value.device
        return None

    def set_fields(self) -> list[str]:
        """Names of the fields that are set."""
        return [name for name in FIELDS if getattr(self, name) is not None]

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The UNet's keyword arguments: ``unet(x, t, **cond.as_kwargs())``."""
        return {name: getattr(self, name) for name in FIELDS}

    def replace(self, **changes: Any) -> Cond:
        return dataclasses.replace(self, **changes)

    def _map(self, fn) -> Cond:
        return Cond(**{name: None if getattr(self, name) is None else fn(name, getattr(self, name))
                       for name in FIELDS})

    # ------------------------------------------------------------------ conversions
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> Cond:
        """Move to ``device``; ``dtype`` applies to the floating-point fields only (the mask stays bool)."""

        def move(_name: str, t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None,
                        non_blocking=non_blocking)

        return self._map(move)

    def detach(self) -> Cond:
        return self._map(lambda _n, t: t.detach())

    # ------------------------------------------------------------------ batch operations
    def index(self, idx: int | slice | Sequence[int] | torch.Tensor) -> Cond:
        """Select samples along the batch dimension. An int keeps the batch dim (``c.index(3)`` has B = 1);
        a slice, a list of ints, a long tensor of indices or a bool tensor of length B are all accepted."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif isinstance(idx, torch.Tensor) and idx.ndim != 1:
            raise ValueError(f"a tensor index must be 1-D, got shape {tuple(idx.shape)}")

        def select(_name: str, t: torch.Tensor) -> torch.Tensor:
            i = idx.to(t.device) if isinstance(idx, torch.Tensor) else idx
            return t[i]

        return self._map(select)

    def __getitem__(self, idx) -> Cond:
        return self.index(idx)

    def repeat_interleave(self, repeats: int) -> Cond:
        """Each sample ``repeats`` times in a row (several images per prompt)."""
        return self._map(lambda _n, t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Concatenate along the batch (classifier-free guidance batches ``[cond, uncond]``).

        Every Cond must set the same fields (a context mask may be missing on some). Contexts of different lengths L are right-padded with zeros
        to the longest, and the padding is masked out (a mask is then created where none was given).
        """
        conds = list(conds)
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond")
        present = [tuple(k for k in c.set_fields() if k != "context_mask") for c in conds]
        if any(p != present[0] for p in present):
            raise ValueError(f"Cond.cat: the Conds set different fields: {present}")
        out: dict[str, torch.Tensor | None] = {name: None for name in FIELDS}
        for name in ("vector", "concat"):
            if name in present[0]:
                out[name] = torch.cat([getattr(c, name) for c in conds], dim=0)
        if "context" in present[0]:
            lengths = {c.context.shape[1] for c in conds}
            any_mask = any(c.context_mask is not None for c in conds)
            if len(lengths) == 1 and not any_mask:
                out["context"] = torch.cat([c.context for c in conds], dim=0)
            else:
                length = max(lengths)
                contexts, masks = [], []
                for c in conds:
                    b, n, _ = c.context.shape
                    mask = c.context_mask
                    if mask is None:
                        mask = torch.ones(b, n, dtype=torch.bool, device=c.context.device)
                    contexts.append(torch.nn.functional.pad(c.context, (0, 0, 0, length - n)))
                    masks.append(torch.nn.functional.pad(mask, (0, length - n), value=False))
                out["context"] = torch.cat(contexts, dim=0)
                out["context_mask"] = torch.cat(masks, dim=0)
        return Cond(**out)

    def __repr__(self) -> str:
        parts = [f"{name}={tuple(getattr(self, name).shape)}" for name in self.set_fields()]
        return f"Cond({', '.join(parts)})"
