"""The unCLIP decoder's inference: CLIP image embeddings (and captions) -> small images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.exports import read_export
from t2i.pipelines.build import check_text_width
from t2i.pipelines.sampling import SamplerSettings, sample
from t2i.pipelines.stage_pipeline import StagePipeline, frozen_text_encoder, load_net


class DecoderPipeline(StagePipeline):
    """net: "denoiser" (ImageEmbeddingUNet), "cond_dropout" (nulls of text tokens and image embedding)."""

    def __init__(self, net, alphas_cumprod, prediction, text_encoder, image_size: int, config=None):
        super().__init__(net, alphas_cumprod, prediction, text_encoder, config)
        self.image_size = image_size

    @classmethod
    def from_export(cls, export_dir: str | Path, device: str | torch.device = "cpu",
                    text_encoder: nn.Module | None = None) -> DecoderPipeline:
        """``text_encoder``: an already loaded copy of the frozen CLIP text tower the export names (the
        prior's, in a chain), instead of loading it again."""
        export = read_export(export_dir, stage="decoder")
        ac, prediction = cls._schedule(export)
        net = load_net(export, ("denoiser", "cond_dropout"))
        text_encoder = text_encoder if text_encoder is not None else frozen_text_encoder(export)
        check_text_width(net["denoiser"], text_encoder, export_dir)
        return cls(net, ac, prediction, text_encoder, int(export.config["model"]["image_size"]),
                   export.config).to(device)

    def condition(self, image_embeds: torch.Tensor | None, prompts: list[str] | None) -> Cond:
        """Cond(text tokens, mask, vector=image embedding); prompts=None (image variations) gives the
        learned null text for every sample; image_embeds=None (caption only, Ramesh et al. 2022 Fig. 9's first
        row) gives the learned null image embedding the decoder was trained with when the embedding was dropped."""
        if image_embeds is None:
            if not prompts:
                raise ValueError("caption-only decoding (image_embeds=None) needs the prompts")
            if "vector" not in self.net["cond_dropout"].p:
                raise ValueError("this decoder never dropped its image embedding in training, so it has no null "
                                 "embedding to decode from the caption alone")
            placeholder = torch.zeros(len(prompts), self.net["denoiser"].embed_dim, device=self.device)
            cond = self.condition(placeholder, prompts)
            return cond.replace(vector=self.net["cond_dropout"].null_like(cond).vector)
        vector = image_embeds.float().to(self.device)
        if self.text_encoder is None or not self.net["denoiser"].text_width:
            return Cond(vector=vector)
        text_cond, _ = clip_text_condition(self.text_encoder, prompts if prompts is not None else [""] * len(vector))
        cond = text_cond.replace(vector=vector)
        if prompts is None:
            cond = self.net["cond_dropout"].null_like(cond).replace(vector=vector)
        return cond

    @torch.no_grad()
    def __call__(self, image_embeds: torch.Tensor | None, prompts: list[str] | None = None,
                 settings: SamplerSettings | None = None, seed: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, image_size, image_size); ``image_embeds=None``: from the captions alone."""
        settings = settings or SamplerSettings()
        if prompts is not None and image_embeds is not None and len(prompts) != len(image_embeds):
            raise ValueError(f"{len(prompts)} prompts for {len(image_embeds)} image embeddings")
        cond = self.condition(image_embeds, prompts)
        uncond = self.net["cond_dropout"].null_like(cond) if self.net["cond_dropout"].p else None
        gen = generator or torch.Generator().manual_seed(seed)
        shape = (cond.batch_size, self.net["denoiser"].in_channels, self.image_size, self.image_size)
        return sample(self.net["denoiser"], self.alphas_cumprod, self.prediction, shape, cond, uncond, settings,
                      generator=gen).clamp(-1, 1)
