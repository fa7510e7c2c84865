"""The diffusion stage: "denoise a target given conditioning", one training path for every system.

A stage is this module plus small named pieces: where the target comes from (a frozen first stage that
encodes images to latents, precomputed latents in the batch, or pixels), how captions become a `Cond`
(a text encoder, trained jointly or frozen), per-key conditioning dropout for classifier-free guidance,
the noise schedule, the parameterization and the loss weighting. EMA of the trained parts is kept in
the module (so checkpoints hold it) and used for sample grids, validation and the export.

This class is the latent diffusion stage. Other systems subclass it and override only their pieces:
``target`` / ``inputs`` (what is denoised), ``condition`` (what conditions it), ``batch_size``, and their
sample grids and pipeline (`t2i.stages.prior`, `t2i.stages.decoder`, `t2i.stages.upsampler`).
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn

from t2i.callbacks.nonfinite import SkippedStepsAware, optimizer_step_skipped
from t2i.conditioning.cond import Cond
from t2i.conditioning.dropout import CondDropout
from t2i.conditioning.precomputed import has_precomputed_text, precomputed_text_condition
from t2i.conditioning.text_encoding import text_condition
from t2i.diffusion import diffusion_loss, make_schedule
from t2i.images import log_grid
from t2i.interop.unet_init import load_unet_weights
from t2i.nn.ema import EMA
from t2i.pipelines.autoencoder import load_autoencoder
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline


def _context_null_width(dropout: CondDropout) -> int | None:
    """The width of a learned or fixed context null (None for a zero null or no context dropout)."""
    null = getattr(dropout, "null_context", None)
    return int(null.shape[-1]) if isinstance(null, torch.Tensor) else None


class DiffusionStage(SkippedStepsAware, L.LightningModule):
    def __init__(self, denoiser: nn.Module, optimizer: partial, text_encoder: nn.Module | None = None,
                 cond_dropout: CondDropout | None = None, first_stage_export: str | None = None,
                 latents_from: str = "image", image_size: int = 256, schedule: dict | None = None,
                 prediction: str = "eps", loss_weighting: str = "uniform", min_snr_gamma: float = 5.0,
                 offset_noise: float = 0.0, lr_scheduler: partial | None = None, ema_decay: float = 0.9999,
                 ema_warmup: bool = True, sample_every_n_steps: int = 1000, sample_prompts: list | None = None,
                 sampler: dict | None = None, sample_seed: int = 0, samples_dir: str | None = None,
                 stage_name: str = "ldm", extra_modules: dict[str, nn.Module] | None = None,
                 denoiser_init: str | None = None):
        super().__init__()
        if denoiser_init:  # imported weights (t2i.cli.import_weights): before the EMA copies the network
            load_unet_weights(denoiser, denoiser_init)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1) (0 turns EMA off), got {ema_decay}")
        if latents_from not in ("image", "batch", "pixels", None):
            raise ValueError(f"latents_from must be image, batch, pixels or None (a subclass's own target), "
                             f"got {latents_from!r}")
        trainable_text = text_encoder is not None and any(p.requires_grad for p in text_encoder.parameters())
        if trainable_text and not getattr(denoiser, "vector_dim", None) and \
                hasattr(text_encoder, "parameters_unused_without_pooled"):
            for p in text_encoder.parameters_unused_without_pooled():  # no gradient would reach them (DDP error)
                p.requires_grad_(False)
        parts = {"denoiser": denoiser, "cond_dropout": cond_dropout or CondDropout({})}
        if trainable_text:
            parts["text_encoder"] = text_encoder
        parts.update(extra_modules or {})  # a subclass's own parts (kept in the EMA and the export)
        self.net = nn.ModuleDict(parts)
        self.frozen_text_encoder = None if trainable_text else text_encoder
        self.first_stage = None
        if latents_from in ("image", "batch"):
            if not first_stage_export:
                raise ValueError("latent diffusion needs first_stage_export (the VAE stage export)")
            self.first_stage = load_autoencoder(first_stage_export)
            if denoiser.in_channels != self.first_stage.latent_channels:
                raise ValueError(f"incompatible input: the UNet takes {denoiser.in_channels} channels but the VAE "
                                 f"export {first_stage_export} makes {self.first_stage.latent_channels}-channel "
                                 f"latents; set model.denoiser.in_channels/out_channels to match")
        width = getattr(text_encoder, "width", None)
        if text_encoder is not None and getattr(denoiser, "context_dim", None) not in (None, width):
            raise ValueError(f"incompatible input: the text encoder gives {width}-wide tokens, the UNet "
                             f"expects context_dim={denoiser.context_dim}")
        null_width = _context_null_width(parts["cond_dropout"])
        if width is not None and null_width not in (None, width):
            raise ValueError(f"incompatible input: the text encoder gives {width}-wide tokens, but the "
                             f"cond_dropout's context null is {null_width} wide; set model.cond_dropout.context_dim"
                             f"={width}")
        self.register_buffer("alphas_cumprod", make_schedule(**(schedule or {})), persistent=False)
        self.latents_from, self.image_size, self.prediction = latents_from, image_size, prediction
        self.loss_weighting, self.min_snr_gamma, self.offset_noise = loss_weighting, min_snr_gamma, offset_noise
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.ema = EMA(self.net, ema_decay, ema_warmup) if ema_decay > 0 else None
        self.sample_every_n_steps, self.sample_prompts = sample_every_n_steps, list(sample_prompts or [])
        self.sampler_settings, self.sample_seed = SamplerSettings(**(sampler or {})), sample_seed
        self.samples_dir, self.stage_name = samples_dir, stage_name
        self._last_step_seen = -1
        self._reference: dict | None = None  # a few validation samples for sample grids (subclasses)

    # ---- pieces ---------------------------------------------------------------------------------
    @property
    def inference_net(self) -> nn.ModuleDict:
        return self.ema.module if self.ema is not None else self.net

    def target(self, batch: dict) -> torch.Tensor:
        """x0, the clean sample the denoiser learns (latents, pixels; subclasses: embeddings...)."""
        if self.latents_from == "batch":
            return self._checked_latents(batch["latent"]).float()
        if self.latents_from == "image":
            return self.first_stage.encode(batch["image"]).float()
        if self.latents_from == "pixels":
            return batch["image"]
        raise NotImplementedError(f"{type(self).__name__} must define target() (latents_from=None)")

    def _checked_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Precomputed ``latent.npy`` must be what the VAE export makes at ``image_size`` (else they were
        written by another VAE or at another resolution, and the UNet would fail or learn the wrong thing)."""
        vae, side = self.first_stage, self.image_size // self.first_stage.downsample_factor
        want = (vae.latent_channels, side, side)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"latent.npy of shape {tuple(latents.shape[1:])} per sample, but the VAE export "
                             f"{vae.source} makes {want} latents at image_size={self.image_size}: were the shards "
                             f"encoded with another VAE or resolution? (rerun data_prep/encode_latents.py with "
                             f"this VAE export; data.array_shapes=[{list(want)}] skips odd samples)")
        return latents

    def inputs(self, batch: dict, net: nn.ModuleDict) -> tuple[torch.Tensor, Cond]:
        """(x0, conditioning before dropout) of a batch; ``net`` is the training net or its EMA."""
        return self.target(batch), self.condition(batch, net)

    def condition(self, batch: dict, net: nn.ModuleDict | None = None) -> Cond:
        """The conditioning of a batch before classifier-free-guidance dropout: captions -> text Cond, or the
        frozen encoder's states precomputed into the batch (data_prep/encode_text.py)."""
        net = net if net is not None else self.net
        if has_precomputed_text(batch):
            encoder = self.frozen_text_encoder
            if encoder is None:
                raise ValueError("precomputed text states in the batch, but this stage has no frozen text encoder "
                                 "(a trained one's states would be stale after the first step): drop them from "
                                 "data.array_fields")
            pooled_dim = encoder.pooled_dim if getattr(net["denoiser"], "vector_dim", None) else None
            return precomputed_text_condition(batch, encoder.width, pooled_dim).to(self.device)
        return text_condition(net, self.frozen_text_encoder, batch["caption"])

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["caption"])

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def _loss(self, batch: dict, net: nn.ModuleDict, generator: torch.Generator | None = None):
        x0, cond = self.inputs(batch, net)
        cond = net["cond_dropout"](cond, generator=generator)
        denoiser = net["denoiser"]
        return diffusion_loss(lambda x, t: denoiser(x, t, **cond.as_kwargs()), x0, self.alphas_cumprod,
                              self.prediction, self.loss_weighting, self.min_snr_gamma, self.offset_noise,
                              generator=generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.batch_size(batch) == 0:  # every sample unusable: a zero step keeps DDP ranks in step
            return sum(p.sum() for p in self.net.parameters() if p.requires_grad) * 0.0
        loss, _ = self._loss(batch, self.net)
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size(batch))
        return loss

    def on_train_start(self) -> None:
        self._last_step_seen = self.global_step  # 0, or the restored step on resume
        if self._reference is None and self.uses_reference and self.samples_on_this_rank():
            self._reference = self.reference_from(self._first_validation_batch())

    def _first_validation_batch(self) -> dict | None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "val_data", None) is None:
            return None
        for batch in dm.loader(dm.val_data, train=False, rank=0, world=1):
            if self.batch_size(batch):
                return dm.on_after_batch_transfer(batch, 0)
        return None

    def optimizer_step(self, *args, **kwargs) -> None:
        """The EMA follows each optimizer step here, before any callback's ``on_train_batch_end`` (where periodic
        checkpoints are written): a checkpoint at step N holds the EMA of step N. A step that `NonFiniteGuard`
        skipped changed no weight, and leaves the EMA (and its warm-up count) as it was."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not optimizer_step_skipped(self.trainer):
            self.ema.update(self.net)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Once per optimizer step (not per batch: gradient accumulation runs several batches a step)."""
        step = self.global_step
        if step == self._last_step_seen:
            return
        self._last_step_seen = step
        if self.ema is not None:
            self.log("train/ema_decay", self.ema.current_decay())
        if self.sample_every_n_steps and step % self.sample_every_n_steps == 0 and self.can_sample():
            self.log_samples(f"samples/step{step}")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.batch_size(batch) == 0:
            return
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)  # same t and noise each time
        loss, _ = self._loss(batch, self.inference_net, generator=gen)
        self.log("val/loss", loss, sync_dist=True, batch_size=self.batch_size(batch))
        if batch_idx == 0 and self._reference is None and self.uses_reference:
            self._reference = self.reference_from(batch)

    def on_fit_end(self) -> None:
        if self.can_sample():
            self.log_samples("samples/final")

    # ---- sampling and export --------------------------------------------------------------------
    uses_reference = False  # sample grids from a few validation samples (decoder, upsampler)

    def reference_from(self, batch: dict | None) -> dict | None:
        """What sample grids need from the first validation batch (nothing: the LDM samples prompts)."""
        return None

    def can_sample(self) -> bool:
        return self._reference is not None if self.uses_reference else bool(self.sample_prompts)

    def pipeline(self) -> TextToImagePipeline:
        """The inference pipeline over the EMA weights (what the export will hold)."""
        return TextToImagePipeline(self.inference_net, self.frozen_text_encoder, self.first_stage,
                                       self.alphas_cumprod, self.prediction, self.image_size)

    def samples_on_this_rank(self) -> bool:
        """Rank 0 draws the sample grids; under ZeRO-3 every rank runs the sampler with it (each forward gathers
        the sharded parameters, a collective) and rank 0 writes the grid."""
        return self.trainer.is_global_zero or bool(getattr(self.trainer.strategy, "zero_stage_3", False))

    def log_samples(self, tag: str) -> None:
        if not self.samples_on_this_rank():
            return
        images = self.pipeline()(self.sample_prompts, self.sampler_settings, seed=self.sample_seed)
        if self.trainer.is_global_zero:
            log_grid(self, tag, images, self.samples_dir, nrow=min(8, len(images)))

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.inference_net.state_dict())
