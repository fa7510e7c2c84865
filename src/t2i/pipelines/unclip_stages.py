"""Inference for each unCLIP stage, no Lightning: the prior (prompts -> CLIP image embeddings), the decoder
(embeddings -> small images) and the upsampler (small -> large images). The training stages use the same
objects for their sample grids and validation metrics; `t2i.pipelines.unclip` chains them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.diffusion import make_schedule
from t2i.exports import Export, read_export
from t2i.pipelines.build import build_from_config, check_text_width, load_module
from t2i.pipelines.ldm import text_condition, text_encoder_of
from t2i.pipelines.sampling import SamplerSettings, sample


@torch.no_grad()
def clip_text_condition(text_encoder: nn.Module, prompts: list[str]) -> tuple[Cond, torch.Tensor]:
    """Captions -> (Cond(context=token states, context_mask), unit CLIP text embeddings (B, D)).

    The tokens are cut after the batch's longest caption: the tower is causal, so the states of real tokens
    do not depend on the padding, and later networks attend to less of it."""
    context, mask, pooled = text_encoder(list(prompts))
    length = max(int(mask.sum(1).max()), 1)
    return (Cond(context=context[:, :length], context_mask=mask[:, :length]),
            F.normalize(pooled.float(), dim=-1))


def _net(export: Export, names: tuple[str, ...]) -> nn.ModuleDict:
    return nn.ModuleDict({name: load_module(export, name, name) for name in names}).eval()


def _frozen_text_encoder(export: Export) -> nn.Module | None:
    node = export.config["model"].get("text_encoder")
    if node is None:
        return None
    return build_from_config(node, export.path / "config.yaml", "model.text_encoder").eval()


class _StagePipeline:
    def __init__(self, net: nn.ModuleDict, alphas_cumprod: torch.Tensor, prediction: str,
                 text_encoder: nn.Module | None = None, config: dict | None = None):
        self.net, self.alphas_cumprod, self.prediction = net, alphas_cumprod, prediction
        self.text_encoder, self.config = text_encoder, config or {}

    @staticmethod
    def _schedule(export: Export) -> tuple[torch.Tensor, str]:
        model = export.config["model"]
        return make_schedule(**model.get("schedule", {})), model.get("prediction", "eps")

    def to(self, device):
        for m in (self.net, self.text_encoder):
            if m is not None:
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net["denoiser"].parameters()).device


class PriorPipeline(_StagePipeline):
    """net: "denoiser" (PriorTransformer), "cond_dropout" (learned text null), "embedding_scale"."""

    @classmethod
    def from_export(cls, export_dir: str | Path, device: str | torch.device = "cpu") -> PriorPipeline:
        export = read_export(export_dir, stage="prior")
        ac, prediction = cls._schedule(export)
        net = _net(export, ("denoiser", "cond_dropout", "embedding_scale"))
        text_encoder = _frozen_text_encoder(export)
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


class DecoderPipeline(_StagePipeline):
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
        net = _net(export, ("denoiser", "cond_dropout"))
        text_encoder = text_encoder if text_encoder is not None else _frozen_text_encoder(export)
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


class UpsamplerPipeline(_StagePipeline):
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
        net = _net(export, ("denoiser", "degradation", *(("cond_dropout",) if model.get("cond_dropout") else ())))
        trained, frozen = text_encoder_of(export)
        if trained is not None:
            net["text_encoder"] = trained
        check_text_width(net["denoiser"], frozen, export_dir)
        return cls(net, ac, prediction, int(model["image_size"]), int(model["low_res"]), export.config,
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
