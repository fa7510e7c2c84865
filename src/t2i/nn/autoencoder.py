"""KL-regularised convolutional autoencoder: the first stage of Latent Diffusion (Rombach et al. 2022).

Module layout and parameter names follow CompVis ``ldm/modules/diffusionmodules/model.py`` so that a
Stable Diffusion VAE checkpoint (``first_stage_model.*`` minus the prefix and the ``loss.*`` keys) maps
key by key onto :class:`AutoencoderKL`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.nn.layers import Upsample, group_norm


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block (no time embedding), 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (q, k, v, proj_out)."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) zero pad, as in CompVis."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, attn: bool, dropout: float, num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, num_groups)


class _CheckpointMixin:
    gradient_checkpointing: bool = False

    def _run(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, h, use_reentrant=False)
        return module(h)

    def _run_mid(self, mid: _MidBlock, h: torch.Tensor) -> torch.Tensor:
        for module in (mid.block_1, mid.attn_1, mid.block_2):
            h = self._run(module, h)
        return h


class Encoder(_CheckpointMixin, nn.Module):
    """Image -> latent moments (``2 * z_channels`` channels), downsampling ``len(channel_mult) - 1`` times."""

    def __init__(self, in_channels: int = 3, base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, z_channels: int = 4, attn_in_mid: bool = True, dropout: float = 0.0,
                 num_groups: int = 32, double_z: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        in_mult = (1, *channel_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            stage = nn.Module()
            block_in, block_out = base_channels * in_mult[level], base_channels * mult
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
            if level != len(channel_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _MidBlock(block_in, attn_in_mid, dropout, num_groups)
        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, (2 if double_z else 1) * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = self._run(block, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self._run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_CheckpointMixin, nn.Module):
    """Latent -> image, with ``num_res_blocks + 1`` residual blocks per resolution level."""

    def __init__(self, out_channels: int = 3, base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, z_channels: int = 4, attn_in_mid: bool = True, dropout: float = 0.0,
                 num_groups: int = 32):
        super().__init__()
        block_in = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _MidBlock(block_in, attn_in_mid, dropout, num_groups)
        up: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            stage = nn.Module()
            block_out = base_channels * channel_mult[level]
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)  # indexed by level (0 = full resolution), as in CompVis
        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._run_mid(self.mid, self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for block in stage.block:
                h = self._run(block, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Diagonal Gaussian posterior from ``moments = cat([mean, logvar], dim=1)``.

    ``kl`` and ``nll`` are computed in float32 (even under bf16 autocast) and summed over non-batch dims.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, shape (B,)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``x`` per sample, shape (B,)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        nll = 0.5 * (math.log(2.0 * math.pi) + logvar + (x.float() - mean).pow(2) / logvar.exp())
        return nll.flatten(1).sum(dim=1)


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> DiagonalGaussian -> post_quant_conv -> Decoder (SD VAE default config)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, latent_channels: int = 4,
                 attn_in_mid: bool = True, dropout: float = 0.0, num_groups: int = 32,
                 gradient_checkpointing: bool = False):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)  # accept Hydra ListConfig
        if not channel_mult:
            raise ValueError("channel_mult must not be empty")
        self._channel_mult = channel_mult
        self._latent_channels = latent_channels
        common = {"base_channels": base_channels, "channel_mult": channel_mult, "num_res_blocks": num_res_blocks,
                  "z_channels": latent_channels, "attn_in_mid": attn_in_mid, "dropout": dropout,
                  "num_groups": num_groups}
        self.encoder = Encoder(in_channels=in_channels, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self._channel_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self._latent_channels

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the decoder's final conv, used for the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute residual/attention blocks in backward (training mode only) to save activation memory."""
        self.encoder.gradient_checkpointing = bool(enabled)
        self.decoder.gradient_checkpointing = bool(enabled)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by the downsample factor {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
