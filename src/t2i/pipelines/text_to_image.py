"""Text-to-image from one stage export: the latent diffusion model (with the VAE export it names) or a
pixel-space base model (Imagen's, GLIDE's): prompts -> images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.text_encoding import text_condition
from t2i.exports import ExportError, read_export
from t2i.pipelines.autoencoder import FrozenAutoencoder, load_autoencoder
from t2i.pipelines.build import check_text_width
from t2i.pipelines.sampling import SamplerSettings, sample
from t2i.pipelines.stage_pipeline import StagePipeline, load_net, text_encoder_of, vae_export_of


class TextToImagePipeline(StagePipeline):
    """Prompts -> images with a latent diffusion export (decoded by its VAE) or a pixel-space base export.

    net: ModuleDict with "denoiser", "cond_dropout" (its learned null is the unconditional input) and, when
    trained jointly, "text_encoder"; a frozen text encoder is passed separately (``text_encoder``)."""

    def __init__(self, net: nn.ModuleDict, frozen_text_encoder: nn.Module | None,
                 first_stage: FrozenAutoencoder | None, alphas_cumprod: torch.Tensor, prediction: str,
                 image_size: int, config: dict | None = None):
        super().__init__(net, alphas_cumprod, prediction, frozen_text_encoder, config)
        self.first_stage, self.image_size = first_stage, image_size

    @classmethod
    def from_export(cls, export_dir: str | Path, vae_export: str | Path | None = None,
                    device: str | torch.device = "cpu", stage: str = "ldm") -> TextToImagePipeline:
        """``stage``: the export's stage type ("ldm"; "base" for a pixel-space text-to-image base model)."""
        export = read_export(export_dir, stage=stage)
        model = export.config["model"]
        net = load_net(export, ("denoiser", "cond_dropout"))
        trained, frozen = text_encoder_of(export)
        if trained is not None:
            net["text_encoder"] = trained
        first_stage = None
        if vae_export_of(model) is not None:
            vae = Path(vae_export or vae_export_of(model))
            if not vae.is_dir():
                raise ExportError(f"{export_dir} needs its VAE export {vae}, which is missing (pass vae_export=)")
            first_stage = load_autoencoder(vae)
            if first_stage.latent_channels != net["denoiser"].in_channels:
                raise ExportError(f"{export_dir} denoises {net['denoiser'].in_channels}-channel latents, but the VAE "
                                  f"export {vae} makes {first_stage.latent_channels}-channel ones: pass the VAE "
                                  f"export this stage was trained with (vae_export=)")
        check_text_width(net["denoiser"], frozen, export_dir)
        ac, prediction = cls._schedule(export)
        return cls(net, frozen, first_stage, ac, prediction, int(model["image_size"]), export.config).to(device)

    def to(self, device) -> TextToImagePipeline:
        super().to(device)
        if self.first_stage is not None:
            self.first_stage.to(device)
        return self

    def condition(self, prompts: list[str]) -> Cond:
        """The prompts' conditioning (token states, mask, pooled vector when the denoiser takes one)."""
        return text_condition(self.net, self.text_encoder, list(prompts))

    def latent_shape(self, n: int) -> tuple[int, ...]:
        side = self.image_size // (self.first_stage.downsample_factor if self.first_stage else 1)
        return (n, self.net["denoiser"].in_channels, side, side)

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SamplerSettings | None = None, seed: int = 0,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W). `noise` (the x_T latents) overrides the seed."""
        settings = settings or SamplerSettings()
        cond = self.condition(prompts)
        uncond = self.net["cond_dropout"].null_like(cond) if self.net["cond_dropout"].p else None
        gen = torch.Generator().manual_seed(seed)
        x = sample(self.net["denoiser"], self.alphas_cumprod, self.prediction, self.latent_shape(len(prompts)),
                   cond, uncond, settings, generator=gen, noise=noise)
        return self.first_stage.decode(x) if self.first_stage is not None else x.clamp(-1, 1)
