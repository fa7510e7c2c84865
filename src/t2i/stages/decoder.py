"""The unCLIP decoder stage: CLIP image embedding (+ caption) -> image, pixel-space diffusion with the
shared UNet (``ImageEmbeddingUNet``: the embedding goes to the timestep embedding and into 4 extra
context tokens beside the caption's CLIP token states).

Classifier-free guidance: the image embedding (``vector``, 10%) and the text tokens (``context``, 50%) are
dropped independently (``CondDropout`` with ``joint: false``), each to its own learned null. Training data:
images at ``image_size`` with ``clip_img.npy`` (data_prep/embed_clip.py) and captions.
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.images import log_grid
from t2i.pipelines.decoder import DecoderPipeline
from t2i.stages.diffusion import DiffusionStage

GRID_SAMPLES = 8


class DecoderStage(DiffusionStage):
    def __init__(self, denoiser: nn.Module, *, text_encoder: nn.Module | None = None, stage_name: str = "decoder",
                 **kwargs):
        if text_encoder is not None and any(p.requires_grad for p in text_encoder.parameters()):
            raise ValueError("the decoder's text encoder is the frozen CLIP text tower (from_clip_export)")
        if (text_encoder is None) != (not denoiser.text_width):
            raise ValueError("give text_encoder exactly when the decoder takes text tokens (denoiser.text_width)")
        if text_encoder is not None and text_encoder.pooled_dim != denoiser.embed_dim:
            raise ValueError(f"incompatible input: the CLIP export gives {text_encoder.pooled_dim}-d embeddings, "
                             f"the decoder expects embed_dim={denoiser.embed_dim}")
        super().__init__(denoiser, text_encoder=text_encoder, latents_from="pixels", stage_name=stage_name,
                         **kwargs)

    def condition(self, batch: dict, net: nn.ModuleDict | None = None) -> Cond:
        embed = batch["clip_img"].float()
        if embed.shape[1] != self.net["denoiser"].embed_dim:
            raise ValueError(f"clip_img of width {embed.shape[1]} != the decoder's embed_dim "
                             f"{self.net['denoiser'].embed_dim}: embeddings of another CLIP export?")
        if self.frozen_text_encoder is None:
            return Cond(vector=embed)
        text_cond, _ = clip_text_condition(self.frozen_text_encoder, batch["caption"])
        return text_cond.replace(vector=embed)

    def pipeline(self) -> DecoderPipeline:
        return DecoderPipeline(self.inference_net, self.alphas_cumprod, self.prediction, self.frozen_text_encoder,
                               self.image_size)

    uses_reference = True

    def reference_from(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        n = min(GRID_SAMPLES, self.batch_size(batch))
        return {"clip_img": batch["clip_img"][:n].detach().cpu(), "caption": list(batch["caption"][:n]),
                "image": batch["image"][:n].detach().cpu()}

    def log_samples(self, tag: str) -> None:
        """Top row: the validation images; bottom row: decoded from their CLIP image embeddings."""
        if not self.samples_on_this_rank():
            return
        ref = self._reference
        images = self.pipeline()(ref["clip_img"].to(self.device), ref["caption"], self.sampler_settings,
                                 seed=self.sample_seed)
        if self.trainer.is_global_zero:
            log_grid(self, tag, torch.cat([ref["image"].to(images.device), images]), self.samples_dir,
                     nrow=len(images))
