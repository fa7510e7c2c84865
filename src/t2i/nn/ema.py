"""Exponential moving average of a module's weights, as a module itself (so its weights live in the
LightningModule's state dict: saved in checkpoints, restored on resume, moved with the model).

Under every strategy:

- DDP, DeepSpeed ZeRO-1/2: parameters are whole on every rank and updated identically, so every rank keeps the
  same average; rank 0's copy is checkpointed and exported.
- ZeRO-3: DeepSpeed partitions the average's parameters like the model's (same sizes, so the same element
  ranges on each rank). Each rank averages its own shard (``param.ds_tensor``): exact, no communication, no
  gathered copy of the model. Small "persistent" parameters, which ZeRO-3 keeps whole, are averaged whole too.
  The shards land in the ZeRO checkpoint and `t2i.cli.export` gathers them.
- FSDP2 (``strategy=fsdp``): the average is sharded like the model (`DiffusionStage.configure_model` shards
  both alike), so each parameter and its average are DTensors of the same placement and ``lerp_`` acts on each
  rank's own shard: exact, no communication. The distributed checkpoint holds the shards; `t2i.cli.export`
  reads them whole.
- The average stays in fp32 whatever the module is cast to (``.half()``, ``.to(bfloat16)``): an update of weight
  1 - 0.9999 vanishes in bf16's 8-bit mantissa.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
        for p in self.module.parameters():
            if p.is_floating_point():
                p.data = p.data.float()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params[name]
            if _is_partitioned(p) or _is_partitioned(e):
                self._update_shard(name, p, e, weight)
            else:
                e.lerp_(p.detach().to(e.dtype), weight)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    @staticmethod
    def _update_shard(name: str, p: torch.Tensor, e: torch.Tensor, weight: float) -> None:
        if not (_is_partitioned(p) and _is_partitioned(e)) or p.ds_tensor.numel() != e.ds_tensor.numel():
            raise RuntimeError(f"EMA under ZeRO-3: parameter {name} and its average are not partitioned alike "
                               f"(the average must be a submodule of the LightningModule DeepSpeed wraps)")
        whole = e.data.numel() == e.ds_numel and p.data.numel() == p.ds_numel  # persistent: whole on every rank
        if whole:
            e.data.lerp_(p.data.detach().to(e.dtype), weight)
        if not (whole and _same_storage(e.data, e.ds_tensor)):  # (one process: the shard may be the whole tensor)
            e.ds_tensor.lerp_(p.ds_tensor.detach().to(e.ds_tensor.dtype), weight)

    def _apply(self, fn, recurse: bool = True):
        """Moves follow the model (``.to(device)``); dtype casts do not: the average stays fp32."""
        super()._apply(fn, recurse)
        for p in self.module.parameters():
            if p.is_floating_point() and p.dtype != torch.float32 and not _is_partitioned(p):
                p.data = p.data.float()
        return self

    def train(self, mode: bool = True) -> EMA:  # the average is never in training mode
        super().train(mode)
        self.module.eval()
        return self
