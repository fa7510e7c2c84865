"""What a diffusion stage conditions on (``model.conditioner``): a batch -> the `Cond` its denoiser takes,
before classifier-free-guidance dropout.

- `Text`: captions through the stage's text encoder (trained jointly, or frozen; a frozen one's states may come
  precomputed in the batch): token states and, when the network takes a vector, the pooled embedding.
  The LDM and the Imagen / GLIDE bases.
- `ClipText`: the frozen CLIP text tower's token states and its unit text embedding as the vector (the unCLIP
  prior).
- `ClipImage`: the sample's CLIP image embedding as the vector, beside the caption's CLIP token states when the
  decoder takes text (the unCLIP decoder).
- `LowRes`: the image downsampled to ``low_res`` and degraded by ``net["degradation"]`` (in training only: the
  EMA net is evaluated on exactly what sampling sees), concatenated to the noisy input, the levels as the
  vector; the caption's states too when the network has cross-attention. With ``crop_size`` the training net
  sees aligned random crops of the target and the low-res image, so this conditioner may change x0.

A conditioner is called as ``conditioner(batch, x0, net, text_encoder) -> (x0, cond)``: ``net`` is the
training net or its EMA (the trained text encoder, nulls and degradation live there), ``text_encoder`` the
frozen one. ``setup`` is called once by the stage: it refuses a denoiser that cannot take what the
conditioner gives, and tells it the stage's image size.
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.lowres import downsample
from t2i.conditioning.precomputed import has_precomputed_text, precomputed_text_condition
from t2i.conditioning.size_crop import size_crop_ids, takes_pooled, with_size_crop
from t2i.conditioning.text_encoding import clip_text_condition, text_condition
from t2i.diffusion.seeded_random import randint


def _frozen(text_encoder: nn.Module, what: str) -> None:
    if any(p.requires_grad for p in text_encoder.parameters()):
        raise ValueError(f"{what}'s text encoder is the frozen CLIP text tower (from_clip_export)")


class Text:
    """``size_embedding``: the width per number of SDXL's size/crop micro-conditioning (`t2i.conditioning.size_crop`,
    256 in SDXL; 0: none), appended to the conditioning vector after the pooled text embedding. A batch may hold
    ``original_size`` and ``crop_top_left`` (B, 2); without them the image is taken as uncropped at its size."""

    def __init__(self, size_embedding: int = 0):
        self.size_embedding, self.pooled, self.image_size, self.pixel_scale = int(size_embedding), None, 0, 1

    def setup(self, denoiser: nn.Module, text_encoder: nn.Module | None, parts: dict, image_size: int,
              pixel_scale: int = 1) -> None:
        if text_encoder is None:
            raise ValueError("a text-to-image stage needs model.text_encoder")
        vector_dim = getattr(denoiser, "vector_dim", None)
        if self.size_embedding:
            self.pooled = takes_pooled(vector_dim, self.size_embedding, text_encoder.pooled_dim)
        elif vector_dim and vector_dim != text_encoder.pooled_dim:
            raise ValueError(f"incompatible input: the text encoder's pooled embedding is {text_encoder.pooled_dim}-d, "
                             f"the UNet's vector_dim is {vector_dim}")
        self.image_size, self.pixel_scale = image_size, pixel_scale

    def __call__(self, batch: dict, x0: torch.Tensor, net: nn.ModuleDict,
                 text_encoder: nn.Module | None) -> tuple[torch.Tensor, Cond]:
        cond = text_cond(batch, net, text_encoder, x0.device, self.pooled)
        if not self.size_embedding:
            return x0, cond
        # the target size is the batch's own: an aspect-ratio bucket's pixels (x0's size times the target's scale)
        size = ((x0.shape[-2] * self.pixel_scale, x0.shape[-1] * self.pixel_scale) if x0.ndim == 4
                else (self.image_size, self.image_size))
        ids = size_crop_ids(len(x0), size, batch.get("original_size"), batch.get("crop_top_left"), device=x0.device)
        return x0, with_size_crop(cond, ids, self.size_embedding)


def text_cond(batch: dict, net: nn.ModuleDict, text_encoder: nn.Module | None, device: torch.device,
              pooled: bool | None = None) -> Cond:
    """Captions -> text Cond, or the frozen encoder's states precomputed into the batch (data_prep/encode_text.py).
    The pooled embedding is in the vector when ``pooled`` (by default: when the denoiser takes a vector)."""
    if pooled is None:
        pooled = bool(getattr(net["denoiser"], "vector_dim", None))
    if has_precomputed_text(batch):
        if text_encoder is None:
            raise ValueError("precomputed text states in the batch, but this stage has no frozen text encoder "
                             "(a trained one's states would be stale after the first step): drop them from "
                             "data.array_fields")
        pooled_dim = text_encoder.pooled_dim if pooled else None
        return precomputed_text_condition(batch, text_encoder.width, pooled_dim).to(device)
    return text_condition(net, text_encoder, batch["caption"], pooled)


class ClipText:
    def setup(self, denoiser: nn.Module, text_encoder: nn.Module | None, parts: dict, image_size: int,
              pixel_scale: int = 1) -> None:
        if text_encoder is None:
            raise ValueError("the prior needs model.text_encoder (the CLIP export's frozen text tower)")
        _frozen(text_encoder, "the prior")
        if text_encoder.width != denoiser.text_width or text_encoder.pooled_dim != denoiser.embed_dim:
            raise ValueError(f"incompatible input: the CLIP text tower gives {text_encoder.width}-wide tokens and "
                             f"{text_encoder.pooled_dim}-d embeddings, the prior expects text_width="
                             f"{denoiser.text_width}, embed_dim={denoiser.embed_dim}")

    def __call__(self, batch: dict, x0: torch.Tensor, net: nn.ModuleDict,
                 text_encoder: nn.Module | None) -> tuple[torch.Tensor, Cond]:
        text, embedding = clip_text_condition(text_encoder, batch["caption"])
        return x0, text.replace(vector=embedding)


class ClipImage:
    def setup(self, denoiser: nn.Module, text_encoder: nn.Module | None, parts: dict, image_size: int,
              pixel_scale: int = 1) -> None:
        if text_encoder is not None:
            _frozen(text_encoder, "the decoder")
        if (text_encoder is None) != (not denoiser.text_width):
            raise ValueError("give text_encoder exactly when the decoder takes text tokens (denoiser.text_width)")
        if text_encoder is not None and text_encoder.pooled_dim != denoiser.embed_dim:
            raise ValueError(f"incompatible input: the CLIP export gives {text_encoder.pooled_dim}-d embeddings, "
                             f"the decoder expects embed_dim={denoiser.embed_dim}")

    def __call__(self, batch: dict, x0: torch.Tensor, net: nn.ModuleDict,
                 text_encoder: nn.Module | None) -> tuple[torch.Tensor, Cond]:
        embed = batch["clip_img"].float()
        if embed.shape[1] != net["denoiser"].embed_dim:
            raise ValueError(f"clip_img of width {embed.shape[1]} != the decoder's embed_dim "
                             f"{net['denoiser'].embed_dim}: embeddings of another CLIP export?")
        if text_encoder is None:
            return x0, Cond(vector=embed)
        text, _ = clip_text_condition(text_encoder, batch["caption"])
        return x0, text.replace(vector=embed)


def aligned_crops(high: torch.Tensor, low: torch.Tensor, crop: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random crops of side ``crop`` of ``high`` and the matching ``crop / factor`` of ``low``
    (offsets on the low-res grid, so the pair stays aligned)."""
    factor = high.shape[-1] // low.shape[-1]
    if crop % factor or crop > high.shape[-1]:
        raise ValueError(f"crop_size {crop} must be a multiple of the scale factor {factor} and <= {high.shape[-1]}")
    small = crop // factor
    b = high.shape[0]
    ys = randint(low.shape[-2] - small + 1, (b,), generator=generator).tolist()
    xs = randint(low.shape[-1] - small + 1, (b,), generator=generator).tolist()
    hi = torch.stack([high[i, :, y * factor:(y + small) * factor, x * factor:(x + small) * factor]
                      for i, (y, x) in enumerate(zip(ys, xs))])
    lo = torch.stack([low[i, :, y:y + small, x:x + small] for i, (y, x) in enumerate(zip(ys, xs))])
    return hi, lo


class LowRes:
    def __init__(self, low_res: int, crop_size: int | None = None):
        self.low_res, self.crop_size = int(low_res), crop_size
        self.image_size: int | None = None

    def setup(self, denoiser: nn.Module, text_encoder: nn.Module | None, parts: dict, image_size: int,
              pixel_scale: int = 1) -> None:
        if "degradation" not in parts:
            raise ValueError("a low-res conditioner needs model.degradation")
        if (text_encoder is None) != (denoiser.context_dim is None):
            raise ValueError("give model.text_encoder exactly when the super-resolution UNet has cross-attention "
                             f"(its context_dim is {denoiser.context_dim})")
        if image_size % self.low_res:
            raise ValueError(f"image_size {image_size} must be a multiple of low_res {self.low_res}")
        self.image_size = image_size
        if self.crop_size is not None and self.crop_size % denoiser.downsample_factor:
            raise ValueError(f"crop_size {self.crop_size} must be divisible by the UNet's "
                             f"{denoiser.downsample_factor}")

    def __call__(self, batch: dict, x0: torch.Tensor, net: nn.ModuleDict,
                 text_encoder: nn.Module | None) -> tuple[torch.Tensor, Cond]:
        """Training net: random crops and random degradation; the EMA net (eval): full images and the fixed
        sampling levels, i.e. exactly what sampling will see."""
        if x0.shape[-1] != self.image_size:
            raise ValueError(f"images of side {x0.shape[-1]} != image_size {self.image_size} (data.resolution)")
        low = downsample(x0, self.low_res)
        if self.crop_size and net.training:
            x0, low = aligned_crops(x0, low, self.crop_size)
        low, levels = net["degradation"](low)
        text = text_cond(batch, net, text_encoder, x0.device) if net["denoiser"].context_dim is not None else Cond()
        return x0, text.replace(vector=levels, concat=low)
