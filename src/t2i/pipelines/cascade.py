"""A cascaded text-to-image pipeline (Imagen; GLIDE with its upsampler; CDM), no Lightning: prompt -> pixel
base model -> super-resolution stage -> ... -> image. Each stage has its own sampler settings (steps, CFG
scale, thresholding), by default the ones its export was trained with (``model.sampler``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2i.exports import ExportError
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline
from t2i.pipelines.upsampler import UpsamplerPipeline

BASE_STAGE, SR_STAGE = "base", "sr"


def trained_settings(config: dict, default: SamplerSettings) -> SamplerSettings:
    node = (config.get("model") or {}).get("sampler")
    return SamplerSettings(**node) if node else default


@dataclass
class CascadeSettings:
    """Sampler settings of the base and of each super-resolution stage (in order); ``sr_noise_levels`` overrides
    each SR stage's trained sampling-time noise-conditioning level (None: as trained)."""
    base: SamplerSettings = field(default_factory=lambda: SamplerSettings(guidance_scale=5.0, thresholding="dynamic"))
    sr: list[SamplerSettings] = field(default_factory=list)
    sr_noise_levels: list[float | None] = field(default_factory=list)

    @classmethod
    def of(cls, base: TextToImagePipeline, upsamplers: list[UpsamplerPipeline]) -> CascadeSettings:
        defaults = cls()
        return cls(base=trained_settings(base.config, defaults.base),
                   sr=[trained_settings(u.config, SamplerSettings(steps=25, guidance_scale=1.0)) for u in upsamplers],
                   sr_noise_levels=[None] * len(upsamplers))


class CascadePipeline:
    def __init__(self, base: TextToImagePipeline, upsamplers: list[UpsamplerPipeline],
                 settings: CascadeSettings | None = None):
        if base.first_stage is not None:
            raise ExportError("a cascade's base model is a pixel-space one (target: Pixels)")
        size = base.image_size
        for i, up in enumerate(upsamplers):
            if up.low_res != size:
                raise ExportError(f"super-resolution stage {i + 1} takes {up.low_res}px inputs but the stage before "
                                  f"it makes {size}px images")
            size = up.image_size
        self.base, self.upsamplers = base, list(upsamplers)
        self.settings = settings or CascadeSettings.of(base, self.upsamplers)
        if len(self.settings.sr) != len(self.upsamplers):
            raise ValueError(f"{len(self.settings.sr)} SR sampler settings for {len(self.upsamplers)} SR stages")

    @classmethod
    def from_exports(cls, base: str | Path, upsamplers: list[str | Path] = (), settings: CascadeSettings | None = None,
                     device: str | torch.device = "cpu") -> CascadePipeline:
        base_pipe = TextToImagePipeline.from_export(base, device=device, stage=BASE_STAGE)
        ups = [UpsamplerPipeline.from_export(u, device, stage=SR_STAGE) for u in upsamplers]
        return cls(base_pipe, ups, settings)

    @property
    def image_size(self) -> int:
        return self.upsamplers[-1].image_size if self.upsamplers else self.base.image_size

    @torch.no_grad()
    def upsample(self, images: torch.Tensor, prompts: list[str], seed: int = 0, start: int = 0) -> list[torch.Tensor]:
        """The outputs of SR stages ``start``, ``start + 1``, ... from ``images`` (the stage before's output)."""
        outs = []
        for i in range(start, len(self.upsamplers)):
            up = self.upsamplers[i]
            images = up(images.to(up.device), self.settings.sr[i], seed=seed + 1 + i,
                        prompts=prompts if up.takes_text else None, noise_level=self.settings.sr_noise_levels[i])
            outs.append(images)
        return outs

    @torch.no_grad()
    def stages(self, prompts: list[str], settings: SamplerSettings | None = None, seed: int = 0
               ) -> list[torch.Tensor]:
        """Every stage's images in [-1, 1]: [base, SR 1, SR 2, ...]. ``settings`` replaces the base's."""
        prompts = list(prompts)
        small = self.base(prompts, settings or self.settings.base, seed=seed)
        return [small, *self.upsample(small, prompts, seed)]

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SamplerSettings | None = None, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] at the final resolution. ``settings`` replaces the base model's sampler settings."""
        return self.stages(prompts, settings, seed)[-1]
