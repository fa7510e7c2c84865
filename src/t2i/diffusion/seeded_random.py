"""Reproducible random draws: numbers come from the generator's own device, then move to the target."""

from __future__ import annotations

import torch


def _draw_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def randn(shape, generator: torch.Generator | None = None, device=None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``N(0, I)`` of ``shape``, drawn on ``generator.device`` (float32 or float64) and then moved/cast, so
    a seeded CPU generator gives the same noise whatever device or half-precision dtype is asked for."""
    draw_device = generator.device if generator is not None else device
    x = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=_draw_dtype(dtype))
    return x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)


def randint(high: int, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Integers uniform in ``[0, high)``, drawn on the generator's device, then moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    x = torch.randint(0, high, tuple(shape), generator=generator, device=draw_device)
    return x.to(device) if device is not None else x
