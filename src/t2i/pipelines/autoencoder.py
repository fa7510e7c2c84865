"""The frozen first stage of latent diffusion, loaded from a VAE export: image <-> scaled latent."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.exports import read_export
from t2i.pipelines.build import load_module


class FrozenAutoencoder(nn.Module):
    """encode: image in [-1, 1] -> posterior mean x latent_scale (unit variance on the training data);
    decode: the inverse. The posterior mean (not a sample) is used, so latents computed on the fly and
    latents precomputed by data_prep/encode_latents.py are the same numbers."""

    def __init__(self, autoencoder: nn.Module, latent_scale: float, source: str = ""):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.latent_scale = float(latent_scale)
        self.source = source

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    def train(self, mode: bool = True) -> FrozenAutoencoder:  # frozen: always eval
        super().train(False)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images).mode() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.latent_scale).clamp(-1, 1)


def load_autoencoder(export_dir: str | Path) -> FrozenAutoencoder:
    export = read_export(export_dir, stage="autoencoder")
    scale = export.metrics.get("latent_scale")
    if scale is None:
        raise ValueError(f"{export_dir}: stage.json has no latent_scale")
    return FrozenAutoencoder(load_module(export, "autoencoder", "autoencoder"), scale, str(export_dir))
