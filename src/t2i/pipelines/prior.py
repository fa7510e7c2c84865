"""The unCLIP prior's inference: prompts -> CLIP image embeddings, best of N by similarity to the caption."""

from __future__ import annotations

from pathlib import Path

import torch

from t2i.conditioning.text_encoding import clip_text_condition
from t2i.exports import read_export
from t2i.pipelines.build import check_text_width
from t2i.pipelines.sampling import SamplerSettings, sample
from t2i.pipelines.stage_pipeline import StagePipeline, frozen_text_encoder, load_net


class PriorPipeline(StagePipeline):
    """net: "denoiser" (PriorTransformer), "cond_dropout" (learned text null), "embedding_scale"."""

    @classmethod
    def from_export(cls, export_dir: str | Path, device: str | torch.device = "cpu") -> PriorPipeline:
        export = read_export(export_dir, stage="prior")
        ac, prediction = cls._schedule(export)
        net = load_net(export, ("denoiser", "cond_dropout", "embedding_scale"))
        text_encoder = frozen_text_encoder(export)
        check_text_width(net["denoiser"], text_encoder, export_dir)
        return cls(net, ac, prediction, text_encoder, export.config).to(device)

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SamplerSettings | None = None, seed: int = 0,
                 best_of: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit CLIP image embeddings (B, D): ``best_of`` samples per prompt, the one most similar to the
        prompt's CLIP text embedding kept (DALL-E 2 samples two and keeps the higher dot product)."""
        if best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {best_of}")
        settings = settings or SamplerSettings()
        text_cond, text_embed = clip_text_condition(self.text_encoder, prompts)
        cond = text_cond.replace(vector=text_embed).repeat_interleave(best_of)
        uncond = self.net["cond_dropout"].null_like(cond) if self.net["cond_dropout"].p else None
        scale = self.net["embedding_scale"]
        gen = generator or torch.Generator().manual_seed(seed)
        x = sample(self.net["denoiser"], self.alphas_cumprod, self.prediction,
                   (len(prompts) * best_of, scale.embed_dim), cond, uncond, settings, generator=gen)
        candidates = scale.decode(x).reshape(len(prompts), best_of, -1)
        sims = (candidates * text_embed.to(candidates.device)[:, None]).sum(-1)
        return candidates[torch.arange(len(prompts)), sims.argmax(1)]
