"""What a diffusion stage denoises (``model.target``): the clean sample x0 a batch gives.

- `Pixels`: the images themselves (the Imagen / GLIDE bases, the unCLIP decoder, every super-resolution stage).
- `VaeLatents`: the latents of a frozen VAE stage export, encoded on the fly from the images or read from
  ``latent.npy`` precomputed into the shards (data_prep/encode_latents.py).
- `ClipImageEmbedding`: the sample's CLIP image embedding (``clip_img.npy``, data_prep/embed_clip.py) mapped by
  the stage's ``embedding_scale`` (the unCLIP prior).

Each names the batch ``field`` it reads (an empty batch has none of it: that counts its samples). ``setup``
is called once by the stage: it refuses a denoiser that cannot take what the target gives, and tells it the
stage's image size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from t2i.pipelines.autoencoder import load_autoencoder


class Pixels(nn.Module):
    field = "image"
    pixel_scale = 1  # image pixels per x0 position

    def setup(self, denoiser: nn.Module, parts: dict[str, nn.Module], image_size: int) -> None:
        pass

    def x0(self, batch: dict, net: nn.ModuleDict) -> torch.Tensor:
        return batch["image"].float()


class VaeLatents(nn.Module):
    """x0 = the frozen VAE's scaled latents of the batch's images (``precomputed``: its ``latent.npy``, which must
    be what this VAE makes at the stage's image size). ``export``: the VAE stage export folder."""

    def __init__(self, export: str, precomputed: bool = False):
        super().__init__()
        if not export:
            raise ValueError("latent diffusion needs model.target.export (the VAE stage export)")
        self.export, self.precomputed, self.image_size = str(export), bool(precomputed), 0
        self.first_stage = load_autoencoder(export)
        self.field = "latent" if precomputed else "image"
        self.pixel_scale = self.first_stage.downsample_factor

    def setup(self, denoiser: nn.Module, parts: dict[str, nn.Module], image_size: int) -> None:
        if denoiser.in_channels != self.first_stage.latent_channels:
            raise ValueError(f"incompatible input: the UNet takes {denoiser.in_channels} channels but the VAE "
                             f"export {self.export} makes {self.first_stage.latent_channels}-channel latents; set "
                             f"model.denoiser.in_channels/out_channels to match")
        self.image_size = image_size

    def x0(self, batch: dict, net: nn.ModuleDict) -> torch.Tensor:
        if self.precomputed:
            return self.checked(batch["latent"], bucketed="original_size" in batch).float()
        return self.first_stage.encode(batch["image"]).float()

    def checked(self, latents: torch.Tensor, bucketed: bool = False) -> torch.Tensor:
        """Precomputed latents must be what this VAE makes at ``image_size`` (else they were written by another
        VAE or at another resolution, and the UNet would fail or learn the wrong thing). Latents of aspect-ratio
        buckets (``bucketed``) vary in size; the stream checks that the shards were encoded for its bucket set."""
        vae, side = self.first_stage, self.image_size // self.first_stage.downsample_factor
        want = (vae.latent_channels, side, side)
        if bucketed and latents.ndim == 4 and latents.shape[1] == vae.latent_channels:
            return latents
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"latent.npy of shape {tuple(latents.shape[1:])} per sample, but the VAE export "
                             f"{vae.source} makes {want} latents at image_size={self.image_size}: were the shards "
                             f"encoded with another VAE or resolution? (rerun data_prep/encode_latents.py with "
                             f"this VAE export; data.array_shapes=[{list(want)}] skips odd samples)")
        return latents


class ClipImageEmbedding(nn.Module):
    """x0 = ``net["embedding_scale"]`` of ``clip_img`` (L2-normalised, then ×√D or the dataset's mean/std). In
    "dataset" mode the scale is measured on the first ``fit_samples`` training samples before the first step."""

    field = "clip_img"

    def __init__(self, fit_samples: int = 10_000):
        super().__init__()
        self.fit_samples = fit_samples

    def setup(self, denoiser: nn.Module, parts: dict[str, nn.Module], image_size: int) -> None:
        scale = parts.get("embedding_scale")
        if scale is None:
            raise ValueError("a CLIP image embedding target needs model.embedding_scale")
        if scale.embed_dim != denoiser.embed_dim:
            raise ValueError(f"embedding_scale.embed_dim {scale.embed_dim} != the prior's embed_dim "
                             f"{denoiser.embed_dim}")

    def x0(self, batch: dict, net: nn.ModuleDict) -> torch.Tensor:
        return net["embedding_scale"].encode(batch["clip_img"])

    def fit(self, nets: list[nn.ModuleDict], batches: Callable[[], Iterable[dict]], device: torch.device) -> None:
        """Measure the dataset statistics of a "dataset" scale once (not when restored from a checkpoint), and
        give every copy of the net (the trained one, its EMA) the same."""
        scale = nets[0]["embedding_scale"]
        if not scale.needs_fit:
            return
        seen = []
        for batch in batches():
            seen.append(batch["clip_img"].float())
            if sum(len(s) for s in seen) >= self.fit_samples:
                break
        scale.fit(torch.cat(seen).to(device))
        for net in nets[1:]:
            net["embedding_scale"].load_state_dict(scale.state_dict())
