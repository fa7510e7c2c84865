"""The diffusion stage: "denoise a target given conditioning", one training path for every system.

A stage is this module and config-built parts (``model.<part>``), so that a system is a configuration:

- ``target`` (`t2i.stages.targets`): the clean x0 of a batch: VAE latents, pixels, a CLIP image embedding;
- ``conditioner`` (`t2i.stages.conditioners`): the `Cond` of a batch: text, CLIP text, CLIP image, a low-res image;
- ``cond_dropout``: per-key conditioning dropout to learned or zero nulls, for classifier-free guidance;
- ``objective`` (`t2i.diffusion.objective`): the noise schedule, the parameterization and the loss weighting;
- ``preview`` (`t2i.stages.previews`): the sample grids or validation metrics shown while training, and the
  inference pipeline they are drawn with.

The networks trained together (the denoiser, the text encoder when trained jointly, the dropout's nulls, the
super-resolution degradation, the prior's embedding scale) are ``net``; an EMA of it is kept in the module (so
checkpoints hold it) and used for sample grids, validation and the export.

=========  ==============  =============  ===============
system     target          conditioner    preview
=========  ==============  =============  ===============
LDM        VaeLatents      Text           PromptGrid
Imagen     Pixels          Text           PromptGrid
prior      ClipImageEmb.   ClipText       EmbeddingCosine
decoder    Pixels          ClipImage      DecoderGrid
SR stages  Pixels          LowRes         UpsamplerGrid
=========  ==============  =============  ===============
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn

from t2i.callbacks.nonfinite import SkippedStepsAware, optimizer_step_skipped
from t2i.conditioning.cond import Cond
from t2i.conditioning.dropout import CondDropout
from t2i.diffusion.objective import DiffusionObjective
from t2i.distributed.fsdp import optimizer_param_groups
from t2i.images import log_grid
from t2i.interop.unet_init import load_unet_weights
from t2i.nn.ema import EMA
from t2i.nn.unet import unet_blocks
from t2i.pipelines.sampling import SamplerSettings
from t2i.stages.conditioners import Text
from t2i.stages.previews import Preview, PromptGrid
from t2i.stages.targets import VaeLatents


def _context_null_width(dropout: CondDropout) -> int | None:
    """The width of a learned or fixed context null (None for a zero null or no context dropout)."""
    null = getattr(dropout, "null_context", None)
    return int(null.shape[-1]) if isinstance(null, torch.Tensor) else None


class DiffusionStage(SkippedStepsAware, L.LightningModule):
    def __init__(self, denoiser: nn.Module, optimizer: partial, target: nn.Module, conditioner=None,
                 objective: DiffusionObjective | None = None, preview: Preview | None = None,
                 text_encoder: nn.Module | None = None, cond_dropout: CondDropout | None = None,
                 degradation: nn.Module | None = None, embedding_scale: nn.Module | None = None,
                 image_size: int = 256, lr_scheduler: partial | None = None, ema_decay: float = 0.9999,
                 ema_warmup: bool = True, sample_every_n_steps: int = 1000, sample_prompts: list | None = None,
                 sampler: dict | None = None, sample_seed: int = 0, samples_dir: str | None = None,
                 stage_name: str = "ldm", denoiser_init: str | None = None):
        super().__init__()
        if denoiser_init:  # imported weights (t2i.cli.import_weights): before the EMA copies the network
            load_unet_weights(denoiser, denoiser_init)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1) (0 turns EMA off), got {ema_decay}")
        conditioner = conditioner if conditioner is not None else Text()
        trainable_text = text_encoder is not None and any(p.requires_grad for p in text_encoder.parameters())
        parts = {"denoiser": denoiser, "cond_dropout": cond_dropout or CondDropout({})}
        if trainable_text:
            parts["text_encoder"] = text_encoder
        parts.update({name: m for name, m in (("degradation", degradation), ("embedding_scale", embedding_scale))
                      if m is not None})
        target.setup(denoiser, parts, image_size)
        conditioner.setup(denoiser, text_encoder, parts, image_size, pixel_scale=getattr(target, "pixel_scale", 1))
        pooled = getattr(conditioner, "pooled", None)  # a vector of sizes alone leaves the pooled embedding out
        pooled = bool(getattr(denoiser, "vector_dim", None)) if pooled is None else pooled
        if trainable_text and not pooled and hasattr(text_encoder, "parameters_unused_without_pooled"):
            for p in text_encoder.parameters_unused_without_pooled():  # no gradient would reach them (DDP error)
                p.requires_grad_(False)
        width = getattr(text_encoder, "width", None)
        if text_encoder is not None and getattr(denoiser, "context_dim", None) not in (None, width):
            raise ValueError(f"incompatible input: the text encoder gives {width}-wide tokens, the UNet "
                             f"expects context_dim={denoiser.context_dim}")
        null_width = _context_null_width(parts["cond_dropout"])
        if width is not None and null_width not in (None, width):
            raise ValueError(f"incompatible input: the text encoder gives {width}-wide tokens, but the "
                             f"cond_dropout's context null is {null_width} wide; set model.cond_dropout.context_dim"
                             f"={width}")
        self.net = nn.ModuleDict(parts)
        self.frozen_text_encoder = None if trainable_text else text_encoder
        self.target, self.conditioner = target, conditioner
        self.objective = objective if objective is not None else DiffusionObjective()
        self.preview = preview if preview is not None else PromptGrid()
        self.image_size = image_size
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.ema = EMA(self.net, ema_decay, ema_warmup) if ema_decay > 0 else None
        self.sample_every_n_steps, self.sample_prompts = sample_every_n_steps, list(sample_prompts or [])
        self.sampler_settings, self.sample_seed = SamplerSettings(**(sampler or {})), sample_seed
        self.samples_dir, self.stage_name = samples_dir, stage_name
        self._last_step_seen = -1
        self._reference: dict | None = None  # a few validation samples for the preview's grids
        self._val_metrics: dict[str, list[torch.Tensor]] = {}

    @property
    def inference_net(self) -> nn.ModuleDict:
        return self.ema.module if self.ema is not None else self.net

    def inputs(self, batch: dict, net: nn.ModuleDict) -> tuple[torch.Tensor, Cond]:
        """(x0, conditioning before dropout) of a batch; ``net`` is the training net or its EMA."""
        return self.conditioner(batch, self.target.x0(batch, net), net, self.frozen_text_encoder)

    def batch_size(self, batch: dict) -> int:
        field = self.target.field
        return len(batch[field]) if field in batch else 0

    def loss(self, batch: dict, net: nn.ModuleDict, generator: torch.Generator | None = None):
        """(loss, diagnostics) of a batch under ``net`` (the training net, or the EMA for validation)."""
        x0, cond = self.inputs(batch, net)
        cond = net["cond_dropout"](cond, generator=generator)
        denoiser = net["denoiser"]
        return self.objective.loss(lambda x, t: denoiser(x, t, **cond.as_kwargs()), x0, generator=generator)

    def pipeline(self):
        """The inference pipeline over the EMA weights (what the export will hold)."""
        return self.preview.pipeline(self)

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(optimizer_param_groups([p for p in self.net.parameters() if p.requires_grad]))
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def on_fit_start(self) -> None:
        fit = getattr(self.target, "fit", None)  # a target measured on the data (the prior's "dataset" scale)
        if fit is not None:
            dm = self.trainer.datamodule  # every rank reads the same first samples: equal statistics
            nets = [self.net] + ([self.ema.module] if self.ema is not None else [])
            fit(nets, lambda: dm.loader(dm.train_data, train=False, rank=0, world=1), self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.batch_size(batch) == 0:  # every sample unusable: a zero step keeps DDP ranks in step
            return sum(p.sum() for p in self.net.parameters() if p.requires_grad) * 0.0
        loss, _ = self.loss(batch, self.net)
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size(batch))
        return loss

    def on_train_start(self) -> None:
        self._last_step_seen = self.global_step  # 0, or the restored step on resume
        if self._reference is None and self.preview.needs_reference and self.samples_on_this_rank():
            batch = self._first_validation_batch()
            self._reference = self.preview.reference_from(batch, self.batch_size(batch)) if batch else None

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
        if self.sample_every_n_steps and step % self.sample_every_n_steps == 0:
            self.log_samples(f"samples/step{step}")

    def on_validation_epoch_start(self) -> None:
        self._val_metrics = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = self.batch_size(batch)
        if n == 0:
            return
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)  # same t and noise each time
        loss, _ = self.loss(batch, self.inference_net, generator=gen)
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        if batch_idx == 0 and self._reference is None and self.preview.needs_reference:
            self._reference = self.preview.reference_from(batch, n)
        for name, values in self.preview.validation_metrics(self, batch, batch_idx).items():
            self._val_metrics.setdefault(name, []).append(values)

    def on_validation_epoch_end(self) -> None:
        for name, values in self._val_metrics.items():
            self.log(f"val/{name}", torch.cat(values).mean(), sync_dist=True)

    def on_fit_end(self) -> None:
        self.log_samples("samples/final")

    # ---- sampling and export --------------------------------------------------------------------
    def samples_on_this_rank(self) -> bool:
        """Rank 0 draws the sample grids; under ZeRO-3 and FSDP every rank runs the sampler with it (each forward
        gathers the sharded parameters, a collective) and rank 0 writes the grid."""
        strategy = self.trainer.strategy
        return self.trainer.is_global_zero or bool(getattr(strategy, "zero_stage_3", False)
                                                   or getattr(strategy, "shards_parameters", False))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = getattr(self.trainer.strategy, "clip_gradients", None)  # FSDP: sharded and whole gradients together
        if clip is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val,
             gradient_clip_algorithm)

    def configure_model(self) -> None:
        """Under ``strategy=fsdp`` (`t2i.distributed.fsdp`): shard the trained network and its EMA copy alike:
        one unit per UNet block, the UNet's remaining layers as its root unit, a jointly trained text encoder as
        a unit of its own. The small rest (the dropout's learned nulls, read outside any forward when sampling)
        stays whole on every rank, its gradients averaged. Other strategies: nothing to do."""
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer is not None else None
        if shard is None:
            return
        from torch.distributed.fsdp import FSDPModule
        if isinstance(self.net["denoiser"], FSDPModule):  # already sharded (a validation after fit calls this again)
            return
        trained = {name: any(p.requires_grad for p in child.parameters()) for name, child in self.net.items()}
        units, roots, whole = [], [], []
        for net in [self.net] + ([self.ema.module] if self.ema is not None else []):
            for name, child in net.items():
                if name == "denoiser":
                    units += unet_blocks(child)
                    roots.append(child)
                elif name == "text_encoder" and trained[name]:
                    roots.append(child)
                else:
                    whole.append(child)
        shard(units, roots, whole)

    def log_samples(self, tag: str) -> None:
        if not self.samples_on_this_rank():
            return
        drawn = self.preview.draw(self, self._reference)
        if drawn is not None and self.trainer.is_global_zero:
            images, nrow = drawn
            log_grid(self, tag, images, self.samples_dir, nrow=nrow)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.inference_net.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written before the VAE moved into ``target`` holds it under ``first_stage.``."""
        state = checkpoint.get("state_dict", {})
        if isinstance(self.target, VaeLatents):
            for key in [k for k in state if k.startswith("first_stage.")]:
                state[f"target.{key}"] = state.pop(key)
