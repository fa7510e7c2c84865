"""The unCLIP diffusion prior stage: caption -> CLIP image embedding, on the one diffusion training path.

Target: the sample's CLIP image embedding (``clip_img.npy``, written by data_prep/embed_clip.py) mapped by
``EmbeddingScale`` (L2-normalised, then ×√D or dataset mean/std, measured before the first step and stored
in the export). Conditioning: the frozen CLIP text tower's token states and its text embedding, dropped
together (learned null) for classifier-free guidance. Validation reports how close sampled embeddings come
to the true image embeddings (cosine), beside two baselines: the caption's text embedding itself, and a
shuffled pairing (another sample's image embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.nn.embedding_scale import EmbeddingScale
from t2i.pipelines.prior import PriorPipeline
from t2i.stages.diffusion import DiffusionStage


class PriorStage(DiffusionStage):
    def __init__(self, denoiser: nn.Module, embedding_scale: EmbeddingScale, *, text_encoder: nn.Module,
                 best_of: int = 2, val_sample_batches: int = 2, scale_fit_samples: int = 10_000,
                 stage_name: str = "prior", **kwargs):
        if any(p.requires_grad for p in text_encoder.parameters()):
            raise ValueError("the prior's text encoder is the frozen CLIP text tower (from_clip_export)")
        if embedding_scale.embed_dim != denoiser.embed_dim:
            raise ValueError(f"embedding_scale.embed_dim {embedding_scale.embed_dim} != the prior's "
                             f"embed_dim {denoiser.embed_dim}")
        if text_encoder.width != denoiser.text_width or text_encoder.pooled_dim != denoiser.embed_dim:
            raise ValueError(f"incompatible input: the CLIP text tower gives {text_encoder.width}-wide tokens and "
                             f"{text_encoder.pooled_dim}-d embeddings, the prior expects text_width="
                             f"{denoiser.text_width}, embed_dim={denoiser.embed_dim}")
        kwargs.setdefault("image_size", 0)
        super().__init__(denoiser, text_encoder=text_encoder, latents_from=None, stage_name=stage_name,
                         extra_modules={"embedding_scale": embedding_scale}, **kwargs)
        self.best_of, self.val_sample_batches, self.scale_fit_samples = best_of, val_sample_batches, scale_fit_samples
        self._val_cos: dict[str, list[torch.Tensor]] = {}

    def target(self, batch: dict) -> torch.Tensor:
        return self.net["embedding_scale"].encode(batch["clip_img"])

    def condition(self, batch: dict, net: nn.ModuleDict | None = None) -> Cond:
        text_cond, text_embed = clip_text_condition(self.frozen_text_encoder, batch["caption"])
        return text_cond.replace(vector=text_embed)

    # ---- dataset statistics of the target ("dataset" scaling) --------------------------------------
    def on_fit_start(self) -> None:
        scale = self.net["embedding_scale"]
        if not scale.needs_fit:  # sqrt_dim, or measured already (restored from a checkpoint)
            return
        datamodule = self.trainer.datamodule  # every rank reads the same first samples: equal statistics
        loader = datamodule.loader(datamodule.train_data, train=False, rank=0, world=1)
        seen = []
        for batch in loader:
            seen.append(batch["clip_img"].float())
            if sum(len(s) for s in seen) >= self.scale_fit_samples:
                break
        scale.fit(torch.cat(seen).to(self.device))
        if self.ema is not None:
            self.ema.module["embedding_scale"].load_state_dict(scale.state_dict())

    # ---- validation: cosine of sampled embeddings to the true ones -------------------------------
    def pipeline(self) -> PriorPipeline:
        return PriorPipeline(self.inference_net, self.alphas_cumprod, self.prediction, self.frozen_text_encoder)

    def on_validation_epoch_start(self) -> None:
        self._val_cos = {"prior": [], "text": [], "shuffled": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        n = self.batch_size(batch)
        if batch_idx >= self.val_sample_batches or n < 2:
            return
        true = F.normalize(batch["clip_img"].float(), dim=-1)
        sampled = self.pipeline()(batch["caption"], self.sampler_settings, seed=batch_idx, best_of=self.best_of)
        _, text_embed = clip_text_condition(self.frozen_text_encoder, batch["caption"])
        self._val_cos["prior"].append((sampled.to(true.device) * true).sum(-1))
        self._val_cos["text"].append((text_embed.to(true.device) * true).sum(-1))
        self._val_cos["shuffled"].append((true.roll(1, dims=0) * true).sum(-1))

    def on_validation_epoch_end(self) -> None:
        for name, values in self._val_cos.items():
            if values:
                self.log(f"val/cos_{name}", torch.cat(values).mean(), sync_dist=True)

    def can_sample(self) -> bool:
        return False  # no images: validation reports the embeddings' cosine instead
