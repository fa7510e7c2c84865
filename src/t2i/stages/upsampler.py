"""The super-resolution stage (unCLIP upsampler; the CDM / Imagen SR stages): the high-res image is the
target; its downsampled copy, degraded in training only (``LowResDegradation``: blur and/or noise, the levels
given to the network), is concatenated to the noisy input. With ``crop_size`` the network trains on aligned
random crops of both (it is convolutional, so it samples at full size).

With a ``text_encoder`` (Imagen's SR stages; GLIDE's upsampler with its own jointly trained one) the caption
conditions it too: token states for cross-attention (from the encoder, or precomputed in the batch), dropped
to a learned null for classifier-free guidance (``cond_dropout`` on ``context``; the low-res image and the
levels are never dropped).
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.conditioning.cond import Cond
from t2i.conditioning.lowres import LowResDegradation, downsample
from t2i.diffusion.seeded_random import randint
from t2i.images import log_grid
from t2i.pipelines.upsampler import UpsamplerPipeline
from t2i.stages.diffusion import DiffusionStage

GRID_SAMPLES = 8


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


class UpsamplerStage(DiffusionStage):
    def __init__(self, denoiser: nn.Module, degradation: LowResDegradation, *, low_res: int, image_size: int,
                 crop_size: int | None = None, stage_name: str = "upsampler", text_encoder: nn.Module | None = None,
                 **kwargs):
        if (text_encoder is None) != (denoiser.context_dim is None):
            raise ValueError("give model.text_encoder exactly when the super-resolution UNet has cross-attention "
                             f"(its context_dim is {denoiser.context_dim})")
        if image_size % low_res:
            raise ValueError(f"image_size {image_size} must be a multiple of low_res {low_res}")
        if crop_size is not None and crop_size % denoiser.downsample_factor:
            raise ValueError(f"crop_size {crop_size} must be divisible by the UNet's {denoiser.downsample_factor}")
        super().__init__(denoiser, latents_from="pixels", image_size=image_size, stage_name=stage_name,
                         text_encoder=text_encoder, extra_modules={"degradation": degradation}, **kwargs)
        self.low_res, self.crop_size = low_res, crop_size

    @staticmethod
    def batch_size(batch: dict) -> int:
        return batch["image"].shape[0] if "image" in batch else 0

    def inputs(self, batch: dict, net: nn.ModuleDict) -> tuple[torch.Tensor, Cond]:
        """Training net: random crops and random degradation; the EMA net (eval): full images and the fixed
        sampling levels, i.e. exactly what sampling will see."""
        high = batch["image"].float()
        if high.shape[-1] != self.image_size:
            raise ValueError(f"images of side {high.shape[-1]} != image_size {self.image_size} (data.resolution)")
        low = downsample(high, self.low_res)
        if self.crop_size and net.training:
            high, low = aligned_crops(high, low, self.crop_size)
        low, levels = net["degradation"](low)
        text = self.condition(batch, net) if self.takes_text else Cond()
        return high, text.replace(vector=levels, concat=low)

    @property
    def takes_text(self) -> bool:
        return self.net["denoiser"].context_dim is not None

    def pipeline(self) -> UpsamplerPipeline:
        return UpsamplerPipeline(self.inference_net, self.alphas_cumprod, self.prediction, self.image_size,
                                 self.low_res, text_encoder=self.frozen_text_encoder)

    uses_reference = True

    def reference_from(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        return {"image": batch["image"][:GRID_SAMPLES].detach().float().cpu(),
                "caption": list(batch["caption"][:GRID_SAMPLES])}

    def log_samples(self, tag: str) -> None:
        """Rows: the validation images, their low-res inputs (enlarged), the upsampled results."""
        if not self.samples_on_this_rank():
            return
        high = self._reference["image"].to(self.device)
        low = downsample(high, self.low_res)
        prompts = self._reference["caption"] if self.takes_text else None
        images = self.pipeline()(low, self.sampler_settings, seed=self.sample_seed, prompts=prompts)
        enlarged = torch.nn.functional.interpolate(low, size=high.shape[-2:], mode="nearest")
        if self.trainer.is_global_zero:
            log_grid(self, tag, torch.cat([high, enlarged, images.to(high.device)]), self.samples_dir, nrow=len(high))
