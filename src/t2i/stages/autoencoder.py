"""The VAE stage (LDM's first stage): a KL-regularised autoencoder trained with a reconstruction loss,
a small KL term, and optionally LPIPS and a patch discriminator (hinge loss, adaptive weight, late
start). Its export carries the latent scale (1 / std of latents on training data)."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torchmetrics import MeanMetric

from t2i.callbacks.nonfinite import optimizer_step_skipped
from t2i.eval.psnr import psnr
from t2i.images import log_grid
from t2i.losses.autoencoder import (
    adaptive_weight,
    foreground_weights,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_loss,
)
from t2i.nn.autoencoder import AutoencoderKL
from t2i.nn.discriminator import PatchDiscriminator


class AutoencoderStage(L.LightningModule):
    stage_name = "autoencoder"

    def __init__(self, autoencoder: AutoencoderKL, optimizer: partial,
                 discriminator: PatchDiscriminator | None = None, disc_optimizer: partial | None = None,
                 lpips: torch.nn.Module | None = None, rec_loss: str = "l1", kl_weight: float = 1e-6,
                 foreground_weight: float = 1.0, lpips_weight: float = 1.0, disc_weight: float = 0.5,
                 disc_start: int = 50_001, grad_clip: float | None = 1.0, grid_every_n_steps: int = 500,
                 samples_dir: str | None = None, lr_scheduler: partial | None = None):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if (discriminator is None) != (disc_optimizer is None):
            raise ValueError("discriminator and disc_optimizer must be given together")
        self.autoencoder, self.discriminator, self.lpips = autoencoder, discriminator, lpips
        self.optimizer_factory, self.disc_optimizer_factory = optimizer, disc_optimizer
        self.lr_scheduler_factory = lr_scheduler  # the autoencoder's optimizer only (the discriminator's stays)
        self.rec_loss, self.kl_weight, self.foreground_weight = rec_loss, kl_weight, foreground_weight
        self.lpips_weight, self.disc_weight, self.disc_start = lpips_weight, disc_weight, disc_start
        self.grad_clip, self.grid_every_n_steps, self.samples_dir = grad_clip, grid_every_n_steps, samples_dir
        self.automatic_optimization = False
        self.val_psnr = MeanMetric()  # the mean of per-image PSNRs over the validation set (all ranks)

    def configure_optimizers(self):
        opts = [self.optimizer_factory(self.autoencoder.parameters())]
        if self.discriminator is not None:
            opts.append(self.disc_optimizer_factory(self.discriminator.parameters()))
        if self.lr_scheduler_factory is None:
            return opts
        return opts, [{"scheduler": self.lr_scheduler_factory(opts[0]), "interval": "step"}]

    def _nll(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        weights = foreground_weights(x, self.foreground_weight) if self.foreground_weight != 1.0 else None
        loss = reconstruction_loss(x, x_rec, self.rec_loss, weights)
        if self.lpips is not None and self.lpips_weight > 0:
            loss = loss + self.lpips_weight * self.lpips(x.float(), x_rec.float()).mean()
        return loss

    def _step(self, opt, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opts = self.optimizers()
        opt_ae = opts[0] if isinstance(opts, list) else opts
        x = batch["image"]
        if x.shape[0] == 0:  # every sample of this batch was unusable: keep ranks in step, learn nothing
            self._step(opt_ae, sum(p.sum() for p in self.autoencoder.parameters()) * 0.0)
            return
        x_rec, posterior = self.autoencoder(x)
        nll, kl = self._nll(x, x_rec), kl_loss(posterior)
        loss = nll + self.kl_weight * kl
        gan_on = self.discriminator is not None and self.global_step >= self.disc_start
        if gan_on:
            g_loss = generator_loss(self.discriminator(x_rec))
            w = adaptive_weight(nll, g_loss, self.autoencoder.last_layer_weight) * self.disc_weight
            loss = loss + w * g_loss
            self.log("train/g_loss", g_loss)
        self._step(opt_ae, loss)
        if gan_on:
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_rec.detach()))
            self._step(opts[1], d_loss)
            self.log("train/d_loss", d_loss)
        scheds = self.lr_schedulers() if not optimizer_step_skipped(self.trainer) else None
        for sched in scheds if isinstance(scheds, list) else [scheds] if scheds else []:
            sched.step()
        self.log_dict({"train/loss": loss, "train/rec": nll, "train/kl": kl}, prog_bar=True)
        if self.grid_every_n_steps and self.global_step % self.grid_every_n_steps == 0:
            self._log_reconstructions(x, x_rec, "train/reconstructions")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        if x.shape[0] == 0:
            return
        posterior = self.autoencoder.encode(x)
        x_rec = self.autoencoder.decode(posterior.mode()).clamp(-1, 1)
        self.val_psnr.update(psnr(x, x_rec))
        self.log("val/rec", reconstruction_loss(x, x_rec, self.rec_loss), sync_dist=True, batch_size=x.shape[0])
        self.log("val/kl", kl_loss(posterior), sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0:
            self._log_reconstructions(x, x_rec, "val/reconstructions")

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        self.val_psnr.reset()

    def _log_reconstructions(self, x: torch.Tensor, x_rec: torch.Tensor, tag: str) -> None:
        if not self.trainer.is_global_zero:
            return
        n = min(8, x.shape[0])
        log_grid(self, tag, torch.cat([x[:n], x_rec[:n]]), self.samples_dir, nrow=n)

    # ---- export -------------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()}

    @torch.no_grad()
    def export_metrics(self, datamodule, max_samples: int = 2048) -> dict:
        """Latent statistics on training data: the scale that gives latents unit variance (SD's 0.18215)."""
        datamodule.setup("fit")
        loader = datamodule.loader(datamodule.train_data, train=True, rank=0, world=1)  # not the fit loader
        total, sq, count, seen = 0.0, 0.0, 0, 0
        self.autoencoder.eval()
        gen = torch.Generator(device=self.device).manual_seed(0)
        for batch in loader:
            x = datamodule.on_after_batch_transfer(batch, 0)["image"].to(self.device)
            if x.shape[0] == 0:
                continue
            z = self.autoencoder.encode(x).sample(generator=gen).double()
            total, sq, count = total + z.sum().item(), sq + (z * z).sum().item(), count + z.numel()
            seen += x.shape[0]
            if seen >= max_samples:
                break
        mean = total / count
        std = (sq / count - mean * mean) ** 0.5
        return {"latent_scale": 1.0 / std, "latent_mean": mean, "latent_std": std, "latent_samples": seen,
                "latent_channels": self.autoencoder.latent_channels,
                "downsample_factor": self.autoencoder.downsample_factor}
