"""Image tensors to files: [-1, 1] float tensors to uint8, grids, PNGs (with text metadata)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, C, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """[-1, 1] images -> one uint8 (C, H, W) grid."""
    return make_grid(to_uint8(images), nrow=nrow, padding=padding, pad_value=255)


def save_png(image_chw_uint8: torch.Tensor, path: str | Path, text: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        meta.add_itxt(k, v)
    arr = np.ascontiguousarray(image_chw_uint8.permute(1, 2, 0).numpy())
    Image.fromarray(arr).save(path, pnginfo=meta)
    return path


def log_grid(module, tag: str, images: torch.Tensor, out_dir: str | Path | None, nrow: int = 8) -> None:
    """Write a grid as PNG under out_dir (step in the name) and to TensorBoard when that logger is on."""
    g = grid(images, nrow=nrow)
    step = module.global_step
    if out_dir is not None:
        save_png(g, Path(out_dir) / f"{tag.replace('/', '_')}_step{step:07d}.png")
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, g, step)
