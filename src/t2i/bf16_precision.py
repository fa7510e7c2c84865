"""bf16 autocast over fp32 weights (``trainer.precision=bf16-mixed``) that lets fused optimizers clip.

Lightning's `MixedPrecision` refuses gradient clipping with any optimizer that could unscale gradients inside
its step (fused AdamW), because with fp16 the gradients it would clip are still multiplied by the loss scale.
bf16 needs no loss scale: there is no scaler, the gradients are the true ones, and clipping them before a
fused step is exact. This plugin clips as the plain precision does whenever there is no scaler, and keeps
Lightning's refusal where there is one (fp16).
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision


class BF16MixedPrecision(MixedPrecision):
    def __init__(self, device: str):
        super().__init__("bf16-mixed", device)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None) -> None:
        if self.scaler is None:
            return Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
        return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)


def autocast_device(accelerator: str | None) -> str:
    """The autocast device of a Trainer's ``accelerator`` setting."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"
