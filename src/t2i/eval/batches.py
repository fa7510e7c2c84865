"""Running a sampler over many prompts or images, a batch at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch


def in_batches(fn: Callable[[slice], torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """``fn`` over consecutive slices of ``range(n)`` of at most `batch_size` items, its outputs concatenated on the
    CPU (callers seed each batch's sampler with ``seed + slice.start``)."""
    return torch.cat([fn(slice(i, min(i + batch_size, n))).cpu() for i in range(0, n, batch_size)])
