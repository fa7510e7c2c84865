"""Super-resolution inference (the unCLIP upsamplers, Imagen's and GLIDE's SR stages): small -> large images,
the low-res input degraded at the fixed sampling noise level, text-conditioned when the stage was."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.text_encoding import text_condition
from t2i.exports import read_export
from t2i.pipelines.build import check_text_width
from t2i.pipelines.sampling import SamplerSettings, sample
from t2i.pipelines.stage_pipeline import StagePipeline, load_net, text_encoder_of


class UpsamplerPipeline(StagePipeline):
    """net: "denoiser" (NoiseLevelUNet), "degradation" (its sampling-time levels) and, for a text-conditioned
    one, "cond_dropout" (the learned text null) and its text encoder ("text_encoder" when trained with it,
    else the frozen ``text_encoder``)."""

    def __init__(self, net, alphas_cumprod, prediction, image_size: int, low_res: int, config=None,
                 text_encoder: nn.Module | None = None):
        super().__init__(net, alphas_cumprod, prediction, text_encoder, config)
        self.image_size, self.low_res = image_size, low_res

    @classmethod
    def from_export(cls, export_dir: str | Path, device: str | torch.device = "cpu",
                    stage: str = "upsampler") -> UpsamplerPipeline:
        """``stage``: the export's stage type ("upsampler"; "sr" for an Imagen / GLIDE super-resolution stage)."""
        export = read_export(export_dir, stage=stage)
        ac, prediction = cls._schedule(export)
        model = export.config["model"]
        net = load_net(export, ("denoiser", "degradation", *(("cond_dropout",) if model.get("cond_dropout") else ())))
        trained, frozen = text_encoder_of(export)
        if trained is not None:
            net["text_encoder"] = trained
        check_text_width(net["denoiser"], frozen, export_dir)
        return cls(net, ac, prediction, int(model["image_size"]), int(model["conditioner"]["low_res"]), export.config,
                   text_encoder=frozen).to(device)

    @property
    def takes_text(self) -> bool:
        return self.net["denoiser"].context_dim is not None

    def degraded(self, low: torch.Tensor, generator: torch.Generator | None = None,
                 noise_level: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-res input as the network sees it at sampling, and its levels: the fixed sampling noise level
        (``noise_level`` overrides the trained config's ``sample_noise_level``), no blur."""
        return self.net["degradation"].eval()(low, generator=generator, noise_level=noise_level)

    @torch.no_grad()
    def __call__(self, low: torch.Tensor, settings: SamplerSettings | None = None, seed: int = 0,
                 generator: torch.Generator | None = None, prompts: list[str] | None = None,
                 noise_level: float | None = None) -> torch.Tensor:
        """Low-res images in [-1, 1] (B, 3, low_res, low_res) -> (B, 3, image_size, image_size). A
        text-conditioned stage needs the ``prompts`` (guided by ``settings.guidance_scale``)."""
        if low.ndim != 4 or low.shape[-1] != self.low_res or low.shape[-2] != self.low_res:
            raise ValueError(f"expected (B, 3, {self.low_res}, {self.low_res}) low-res images, got {tuple(low.shape)}")
        if self.takes_text and (prompts is None or len(prompts) != len(low)):
            raise ValueError(f"this super-resolution stage is text-conditioned: give one prompt per image "
                             f"({len(low)}), got {None if prompts is None else len(prompts)}")
        settings = settings or SamplerSettings()
        gen = generator or torch.Generator().manual_seed(seed)
        low_in, levels = self.degraded(low.float().to(self.device), gen, noise_level)
        text = text_condition(self.net, self.text_encoder, list(prompts)) if self.takes_text else Cond()
        cond = text.replace(vector=levels, concat=low_in)
        dropout = self.net["cond_dropout"] if "cond_dropout" in self.net else None  # noqa: SIM401 (no ModuleDict.get)
        uncond = dropout.null_like(cond) if dropout is not None and dropout.p else None
        shape = (len(low), self.net["denoiser"].in_channels, self.image_size, self.image_size)
        return sample(self.net["denoiser"], self.alphas_cumprod, self.prediction, shape, cond, uncond, settings,
                      generator=gen).clamp(-1, 1)
