"""Exponential moving average of a module's weights, as a module itself (so its weights live in the
LightningModule's state dict: saved in checkpoints, restored on resume, moved with the model)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema.update(model)`` after each optimizer step; ``ema.module`` is the averaged copy.

    decay_n = min(decay, (1 + n) / (10 + n)) when warm-up is on: the average follows the raw weights
    closely early on, so short runs are not dominated by the random init (LDM's LitEma does the same).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), weight)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:  # the average is never in training mode
        super().train(mode)
        self.module.eval()
        return self
