"""unCLIP text-to-image (Ramesh et al. 2022), no Lightning: prompt -> prior -> CLIP image embedding ->
decoder -> small image -> upsampler -> image. Image variations: image -> CLIP image embedding -> decoder
(text nulled) -> upsampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2i.exports import ExportError, read_export
from t2i.pipelines.decoder import DecoderPipeline
from t2i.pipelines.prior import PriorPipeline
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.upsampler import UpsamplerPipeline


@dataclass
class UnclipSettings:
    """Per-stage sampler settings; ``from_exports`` takes each stage's from its training config."""
    prior: SamplerSettings = field(default_factory=lambda: SamplerSettings(steps=25, guidance_scale=1.0))
    decoder: SamplerSettings = field(default_factory=lambda: SamplerSettings(steps=50, guidance_scale=3.0))
    upsampler: SamplerSettings = field(default_factory=lambda: SamplerSettings(steps=25, guidance_scale=1.0))
    best_of: int = 2

    @classmethod
    def of(cls, prior: PriorPipeline, decoder: DecoderPipeline, upsampler: UpsamplerPipeline | None) -> UnclipSettings:
        def trained(pipe) -> SamplerSettings | None:
            node = None if pipe is None else (pipe.config.get("model") or {}).get("sampler")
            return SamplerSettings(**node) if node else None

        defaults = cls()
        return cls(prior=trained(prior) or defaults.prior, decoder=trained(decoder) or defaults.decoder,
                   upsampler=trained(upsampler) or defaults.upsampler,
                   best_of=int((prior.config.get("model") or {}).get("best_of", defaults.best_of)))


def _clip_export_of(pipe) -> str | None:
    node = (pipe.config.get("model") or {}).get("text_encoder") or {}
    return node.get("export_dir")


class UnclipPipeline:
    def __init__(self, prior: PriorPipeline, decoder: DecoderPipeline, upsampler: UpsamplerPipeline | None = None,
                 image_encoder: torch.nn.Module | None = None, settings: UnclipSettings | None = None):
        if upsampler is not None and upsampler.low_res != decoder.image_size:
            raise ExportError(f"the upsampler takes {upsampler.low_res}px inputs but the decoder makes "
                              f"{decoder.image_size}px images")
        prior_dim, decoder_dim = prior.net["embedding_scale"].embed_dim, decoder.net["denoiser"].embed_dim
        if prior_dim != decoder_dim:
            raise ExportError(f"the prior makes {prior_dim}-d embeddings, the decoder takes {decoder_dim}-d")
        self.prior, self.decoder, self.upsampler, self.image_encoder = prior, decoder, upsampler, image_encoder
        self.settings = settings or UnclipSettings.of(prior, decoder, upsampler)

    @classmethod
    def from_exports(cls, prior: str | Path, decoder: str | Path, upsampler: str | Path | None = None,
                     clip: str | Path | None = None, settings: UnclipSettings | None = None,
                     device: str | torch.device = "cpu") -> UnclipPipeline:
        """``clip`` (the CLIP stage export, for variations) defaults to the one the prior was trained on."""
        prior_pipe = PriorPipeline.from_export(prior, device)
        decoder_clip = ((read_export(decoder, stage="decoder").config.get("model") or {}).get("text_encoder")
                        or {}).get("export_dir")
        if decoder_clip is not None and decoder_clip != _clip_export_of(prior_pipe):
            raise ExportError(f"the prior ({_clip_export_of(prior_pipe)}) and the decoder ({decoder_clip}) were "
                              f"trained on different CLIP exports")
        # a decoder with text tokens reads the prior's frozen CLIP text tower: load it once
        shared = prior_pipe.text_encoder if decoder_clip is not None else None
        decoder_pipe = DecoderPipeline.from_export(decoder, device, text_encoder=shared)
        upsampler_pipe = UpsamplerPipeline.from_export(upsampler, device) if upsampler else None
        clip = clip or _clip_export_of(prior_pipe)
        image_encoder = None
        if clip and Path(clip).is_dir():
            from t2i.conditioning.clip import ClipImageEncoder
            image_encoder = ClipImageEncoder.from_clip_export(clip).to(device)
        return cls(prior_pipe, decoder_pipe, upsampler_pipe, image_encoder, settings)

    @property
    def image_size(self) -> int:
        return self.upsampler.image_size if self.upsampler is not None else self.decoder.image_size

    def upsample(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        if self.upsampler is None:
            return images
        return self.upsampler(images, self.settings.upsampler, seed=seed + 2)

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SamplerSettings | None = None, seed: int = 0,
                 image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] at the final resolution. ``settings`` replaces the decoder's sampler settings.
        ``image_embeds`` (unit CLIP image embeddings) skips the prior: the decoder is given them directly
        (e.g. the true embeddings, for evaluation)."""
        prompts = list(prompts)
        if image_embeds is None:
            image_embeds = self.prior(prompts, self.settings.prior, seed=seed, best_of=self.settings.best_of)
        small = self.decoder(image_embeds, prompts, settings or self.settings.decoder, seed=seed + 1)
        return self.upsample(small, seed)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (any size) -> unit CLIP image embeddings."""
        if self.image_encoder is None:
            raise ExportError("no CLIP image encoder: pass clip=<CLIP stage export> for image variations")
        return torch.nn.functional.normalize(self.image_encoder(images.to(self.decoder.device)).float(), dim=-1)

    @torch.no_grad()
    def variations(self, images: torch.Tensor, settings: SamplerSettings | None = None, seed: int = 0,
                   num_variations: int = 1) -> torch.Tensor:
        """(B * num_variations) images decoded from each input image's CLIP embedding, text nulled."""
        embeds = self.embed_images(images).repeat_interleave(num_variations, dim=0)
        small = self.decoder(embeds, None, settings or self.settings.decoder, seed=seed + 1)
        return self.upsample(small, seed)
