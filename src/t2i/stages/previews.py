"""What a diffusion stage shows while it trains (``model.preview``), and the inference pipeline it shows it with
(the same pipeline its export will load, over the EMA weights).

- `PromptGrid`: images of the stage's ``sample_prompts`` (the LDM and the Imagen / GLIDE bases).
- `DecoderGrid`: a few validation images above the images decoded from their CLIP image embeddings (the unCLIP
  decoder).
- `UpsamplerGrid`: a few validation images, their low-res inputs enlarged, and the upsampled results (every
  super-resolution stage).
- `EmbeddingCosine`: no images; validation reports how close sampled CLIP image embeddings come to the true
  ones (cosine), beside two baselines: the caption's text embedding itself, and a shuffled pairing (another
  sample's image embedding). The unCLIP prior.

A preview may keep a ``reference`` (a few samples of the first validation batch) to draw from; ``draw`` returns
the grid's images and its row length, or None when there is nothing to draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i.conditioning.lowres import downsample
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.pipelines.decoder import DecoderPipeline
from t2i.pipelines.prior import PriorPipeline
from t2i.pipelines.text_to_image import TextToImagePipeline
from t2i.pipelines.upsampler import UpsamplerPipeline


class Preview:
    needs_reference = False

    def pipeline(self, stage):
        """The stage's inference pipeline over its EMA weights."""
        raise NotImplementedError(f"{type(self).__name__} must say which pipeline its stage samples with")

    def reference_from(self, batch: dict, n: int) -> dict | None:
        return None

    def draw(self, stage, reference: dict | None) -> tuple[torch.Tensor, int] | None:
        return None

    def validation_metrics(self, stage, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-sample values to average over the validation epoch (logged as ``val/<name>``)."""
        return {}


class PromptGrid(Preview):
    def pipeline(self, stage) -> TextToImagePipeline:
        return TextToImagePipeline(stage.inference_net, stage.frozen_text_encoder,
                                   getattr(stage.target, "first_stage", None), stage.objective.alphas_cumprod,
                                   stage.objective.prediction, stage.image_size,
                                   size_embedding=getattr(stage.conditioner, "size_embedding", 0))

    def draw(self, stage, reference: dict | None) -> tuple[torch.Tensor, int] | None:
        if not stage.sample_prompts:
            return None
        images = self.pipeline(stage)(stage.sample_prompts, stage.sampler_settings, seed=stage.sample_seed)
        return images, min(8, len(images))


class ReferenceGrid(Preview):
    """Grids drawn from ``samples`` validation samples (their images and captions, plus ``fields``)."""

    needs_reference = True
    fields: tuple[str, ...] = ()

    def __init__(self, samples: int = 8):
        self.samples = samples

    def reference_from(self, batch: dict, n: int) -> dict | None:
        n = min(self.samples, n)
        ref = {"image": batch["image"][:n].detach().float().cpu(), "caption": list(batch["caption"][:n])}
        ref.update({k: batch[k][:n].detach().cpu() for k in self.fields})
        return ref


class DecoderGrid(ReferenceGrid):
    fields = ("clip_img",)

    def pipeline(self, stage) -> DecoderPipeline:
        return DecoderPipeline(stage.inference_net, stage.objective.alphas_cumprod, stage.objective.prediction,
                               stage.frozen_text_encoder, stage.image_size)

    def draw(self, stage, reference: dict | None) -> tuple[torch.Tensor, int] | None:
        """Top row: the validation images; bottom row: decoded from their CLIP image embeddings."""
        if reference is None:
            return None
        images = self.pipeline(stage)(reference["clip_img"].to(stage.device), reference["caption"],
                                      stage.sampler_settings, seed=stage.sample_seed)
        return torch.cat([reference["image"].to(images.device), images]), len(images)


class UpsamplerGrid(ReferenceGrid):
    def pipeline(self, stage) -> UpsamplerPipeline:
        return UpsamplerPipeline(stage.inference_net, stage.objective.alphas_cumprod, stage.objective.prediction,
                                 stage.image_size, stage.conditioner.low_res, text_encoder=stage.frozen_text_encoder)

    def draw(self, stage, reference: dict | None) -> tuple[torch.Tensor, int] | None:
        """Rows: the validation images, their low-res inputs (enlarged), the upsampled results."""
        if reference is None:
            return None
        pipe = self.pipeline(stage)
        high = reference["image"].to(stage.device)
        low = downsample(high, pipe.low_res)
        prompts = reference["caption"] if pipe.takes_text else None
        images = pipe(low, stage.sampler_settings, seed=stage.sample_seed, prompts=prompts)
        enlarged = F.interpolate(low, size=high.shape[-2:], mode="nearest")
        return torch.cat([high, enlarged, images.to(high.device)]), len(high)


class EmbeddingCosine(Preview):
    """Cosine of ``best_of`` sampled embeddings to the true ones on the first ``batches`` validation batches."""

    def __init__(self, batches: int = 2, best_of: int = 2):
        self.batches, self.best_of = batches, best_of

    def pipeline(self, stage) -> PriorPipeline:
        return PriorPipeline(stage.inference_net, stage.objective.alphas_cumprod, stage.objective.prediction,
                             stage.frozen_text_encoder)

    def validation_metrics(self, stage, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        if batch_idx >= self.batches or len(batch["caption"]) < 2:
            return {}
        true = F.normalize(batch["clip_img"].float(), dim=-1)
        sampled = self.pipeline(stage)(batch["caption"], stage.sampler_settings, seed=batch_idx,
                                       best_of=self.best_of)
        _, text_embed = clip_text_condition(stage.frozen_text_encoder, batch["caption"])
        return {"cos_prior": (sampled.to(true.device) * true).sum(-1),
                "cos_text": (text_embed.to(true.device) * true).sum(-1),
                "cos_shuffled": (true.roll(1, dims=0) * true).sum(-1)}
