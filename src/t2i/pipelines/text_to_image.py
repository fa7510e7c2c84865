"""Text-to-image from one stage export: the latent diffusion model (with the VAE export it names) or a
pixel-space base model (Imagen's, GLIDE's): prompts -> images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.size_crop import size_crop_ids, takes_pooled, with_size_crop
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
                 image_size: int, config: dict | None = None, size_embedding: int = 0):
        super().__init__(net, alphas_cumprod, prediction, frozen_text_encoder, config)
        self.first_stage, self.image_size, self.size_embedding = first_stage, image_size, size_embedding

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
        size_embedding = int((model.get("conditioner") or {}).get("size_embedding", 0))
        return cls(net, frozen, first_stage, ac, prediction, int(model["image_size"]), export.config,
                   size_embedding).to(device)

    def to(self, device) -> TextToImagePipeline:
        super().to(device)
        if self.first_stage is not None:
            self.first_stage.to(device)
        return self

    def condition(self, prompts: list[str], original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None) -> Cond:
        """The prompts' conditioning (token states, mask, pooled vector when the denoiser takes one) and, for a
        size-conditioned UNet, the size/crop embedding: by default an uncropped image of the size drawn."""
        if not self.size_embedding:
            if original_size is not None or tuple(crop_top_left) != (0, 0):
                raise ValueError("this model takes no size/crop conditioning (model.conditioner.size_embedding: 0)")
            return text_condition(self.net, self.text_encoder, list(prompts))
        encoder = self.net["text_encoder"] if "text_encoder" in self.net else self.text_encoder  # noqa: SIM401 (ModuleDict has no get)
        pooled = takes_pooled(self.net["denoiser"].vector_dim, self.size_embedding, encoder.pooled_dim)
        cond = text_condition(self.net, self.text_encoder, list(prompts), pooled)
        n, side = len(prompts), size or (self.image_size, self.image_size)
        ids = size_crop_ids(n, side, torch.tensor([list(original_size or side)] * n),
                            torch.tensor([list(crop_top_left)] * n), device=self.device)
        return with_size_crop(cond, ids, self.size_embedding)

    def latent_shape(self, n: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """The shape sampled for ``n`` images of ``height`` x ``width`` pixels (default: the trained square)."""
        factor = self.first_stage.downsample_factor if self.first_stage else 1
        stride = factor * getattr(self.net["denoiser"], "downsample_factor", 1)
        height, width = height or self.image_size, width or self.image_size
        if height % stride or width % stride:
            raise ValueError(f"height and width must be multiples of {stride} (the VAE's {factor} x the UNet's "
                             f"{stride // factor}), got {height}x{width}")
        return (n, self.net["denoiser"].in_channels, height // factor, width // factor)

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SamplerSettings | None = None, seed: int = 0,
                 noise: torch.Tensor | None = None, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0), height: int | None = None,
                 width: int | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W): ``height`` x ``width`` (default: the trained square). `noise` (the x_T
        latents) overrides the seed. ``original_size`` and ``crop_top_left``: the micro-conditioning asked for (a
        size-conditioned UNet only; by default an uncropped image of the size drawn)."""
        settings = settings or SamplerSettings()
        shape = self.latent_shape(len(prompts), height, width)
        cond = self.condition(prompts, original_size, crop_top_left,
                              (height or self.image_size, width or self.image_size))
        uncond = self.net["cond_dropout"].null_like(cond) if self.net["cond_dropout"].p else None
        gen = torch.Generator().manual_seed(seed)
        x = sample(self.net["denoiser"], self.alphas_cumprod, self.prediction, shape,
                   cond, uncond, settings, generator=gen, noise=noise)
        return self.first_stage.decode(x) if self.first_stage is not None else x.clamp(-1, 1)
