"""Learning-rate schedules that configs can name (a YAML file cannot hold a lambda)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up, then cosine decay to `min_ratio` of the base rate at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return LambdaLR(optimizer, factor)
