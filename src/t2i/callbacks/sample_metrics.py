"""`SampleMetrics`: domain FID and CLIP score of generated samples at the end of validation.

    python -m t2i.cli.train experiment=tiny/ldm \\
        +callbacks.sample_metrics._target_=t2i.callbacks.sample_metrics.SampleMetrics \\
        +callbacks.sample_metrics.clip_export=runs/tiny-clip/export +callbacks.sample_metrics.num_samples=256

At the end of each validation (not the sanity check) the stage's pipeline (``pl_module.pipeline()(prompts,
settings, seed=...)``: the LDM and the Imagen/GLIDE base stages) generates one image for each of the first
``num_samples`` validation captions, and the callback logs

- ``val/domain_fid``: the Fréchet distance between the CLIP image embeddings (L2-normalised) of those samples
  and of the same validation images (`t2i.eval.fid`, domain FID: comparable only between runs judged by the
  same CLIP export on the same validation set with the same ``num_samples``);
- ``val/clip_score``: 100 * mean(max(cos(image, caption), 0)) with the same export (`t2i.eval.clip_score`);
- ``val/fid`` when ``inception_weights`` names the local FID Inception file (needs ``t2i[eval]``; slow on a CPU).

Rank 0 measures (every rank samples under ZeRO-3, whose forward passes are collectives) and broadcasts the
numbers, so every rank logs the same values. The real images' statistics are computed once and kept. Sampling
uses its own seeded generator: the training RNG streams are untouched (exact resume still holds).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import lightning as L
import torch

from t2i.conditioning.clip import STAGE as CLIP_STAGE
from t2i.eval.clip_score import ClipEmbedder, ClipScore
from t2i.eval.fid import ClipImageFeatures, InceptionFeatures, feature_stats
from t2i.exports import read_export
from t2i.pipelines.sampling import SamplerSettings

log = logging.getLogger("t2i.sample_metrics")


class SampleMetrics(L.Callback):
    def __init__(self, clip_export: str, num_samples: int = 64, steps: int = 20, guidance_scale: float | None = None,
                 eta: float = 0.0, batch_size: int = 64, seed: int = 0, every_n_validations: int = 1,
                 inception_weights: str | None = None, normalize: bool = True, prefix: str = "val/"):
        for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size),
                            ("every_n_validations", every_n_validations)):
            if value < 1:
                raise ValueError(f"SampleMetrics: {name} must be >= 1, got {value}")
        if num_samples < 2:
            raise ValueError("SampleMetrics: a Fréchet distance needs num_samples >= 2")
        self.clip_export, self.inception_weights = str(clip_export), inception_weights
        self.num_samples, self.steps, self.guidance_scale, self.eta = num_samples, steps, guidance_scale, eta
        self.batch_size, self.seed, self.every = batch_size, seed, every_n_validations
        self.normalize, self.prefix = normalize, prefix
        self.last: dict[str, float] = {}
        self._validations = 0
        self._reference: tuple[list[str], torch.Tensor] | None = None  # (captions, uint8 images)
        self._real: dict = {}  # feature kind -> FeatureStats of the real images
        self._clip: ClipEmbedder | None = None
        self._domain: ClipImageFeatures | None = None
        self._inception: InceptionFeatures | None = None

    # ---- setup --------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "pipeline", None)):
            raise TypeError(f"SampleMetrics needs a text-to-image stage with pipeline()(prompts, settings, seed=...); "
                            f"{type(pl_module).__name__} has none")
        read_export(self.clip_export, CLIP_STAGE)  # a missing or wrong export fails now, not after training

    def _judges(self, device: torch.device) -> None:
        if self._clip is None:
            self._clip = ClipEmbedder.from_clip_export(self.clip_export, device)
            self._domain = ClipImageFeatures(self._clip.image_encoder, device, normalize=self.normalize)
            self._domain.source = self.clip_export
            if self.inception_weights:
                self._inception = InceptionFeatures(self.inception_weights, device)

    def _reference_set(self, trainer: L.Trainer) -> tuple[list[str], torch.Tensor] | None:
        """The first `num_samples` validation samples (captions, uint8 images), read once."""
        if self._reference is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or getattr(dm, "val_data", None) is None:
                return None
            captions, images, n = [], [], 0
            for batch in dm.loader(dm.val_data, train=False, rank=0, world=1):
                take = min(len(batch["caption"]), self.num_samples - n)
                captions += list(batch["caption"][:take])
                images.append(batch["image"][:take])
                n += take
                if n >= self.num_samples:
                    break
            if n < 2:
                return None
            self._reference = (captions, torch.cat(images))
            if n < self.num_samples:
                log.warning("SampleMetrics: the validation set holds %d samples, fewer than num_samples=%d", n,
                            self.num_samples)
        return self._reference

    def settings(self, pl_module: L.LightningModule) -> SamplerSettings:
        base = getattr(pl_module, "sampler_settings", None) or SamplerSettings()
        scale = base.guidance_scale if self.guidance_scale is None else self.guidance_scale
        return dataclasses.replace(base, steps=self.steps, eta=self.eta, guidance_scale=scale)

    # ---- measuring ----------------------------------------------------------------------------------------
    def generate(self, pl_module: L.LightningModule, prompts: list[str]) -> torch.Tensor:
        """One image per prompt in [-1, 1], on the CPU; batch k uses seed ``seed + k * batch_size``."""
        pipe, settings = pl_module.pipeline(), self.settings(pl_module)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            images = pipe(prompts[start:start + self.batch_size], settings, seed=self.seed + start)
            if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
                raise TypeError(f"SampleMetrics: {type(pl_module).__name__}'s pipeline does not return images "
                                f"(B, 3, H, W)")
            out.append(images.float().cpu())
        return torch.cat(out)

    def measure(self, pl_module: L.LightningModule, prompts: list[str], real: torch.Tensor,
                generated: torch.Tensor) -> dict[str, float]:
        self._judges(pl_module.device)
        kinds = [("domain_fid", self._domain)] + ([("fid", self._inception)] if self._inception else [])
        values = {}
        for name, features in kinds:
            if name not in self._real:
                self._real[name] = feature_stats(features, real, self.batch_size)
            values[name] = self._real[name].distance(feature_stats(features, generated, self.batch_size))
        score = ClipScore(self._clip)
        for start in range(0, len(prompts), self.batch_size):
            score.update(generated[start:start + self.batch_size], prompts[start:start + self.batch_size])
        values["clip_score"] = score.compute()
        return values

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        samples_here = (pl_module.samples_on_this_rank() if hasattr(pl_module, "samples_on_this_rank")
                        else trainer.is_global_zero)
        values = None
        if samples_here or trainer.is_global_zero:
            reference = self._reference_set(trainer)
            if reference is not None:
                start = time.perf_counter()
                prompts, real = reference
                generated = self.generate(pl_module, prompts)
                if trainer.is_global_zero:
                    values = self.measure(pl_module, prompts, real, generated)
                    log.info("SampleMetrics: %d samples, %d steps: %s (%.1f s)", len(prompts), self.steps,
                             values, time.perf_counter() - start)
        values = trainer.strategy.broadcast(values, src=0)
        if values is None:
            log.warning("SampleMetrics: no validation data (need at least 2 samples): nothing measured")
            return
        self.last = dict(values)
        for name, value in values.items():
            if not math.isfinite(value):
                log.warning("SampleMetrics: %s is %s", name, value)
            # every rank holds the same numbers: the mean over ranks (sync_dist) is that number
            pl_module.log(self.prefix + name, float(value), sync_dist=True)
