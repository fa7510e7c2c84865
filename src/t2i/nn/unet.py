"""ADM / Latent-Diffusion UNet for diffusion denoisers (Dhariwal & Nichol 2021; Rombach et al. 2022).

Module layout and parameter names follow CompVis ``ldm/modules/diffusionmodules/openaimodel.py::UNetModel``
(``time_embed.{0,2}``, ``input_blocks.{i}.{j}``, ``middle_block.{0,1,2}``, ``output_blocks.{i}.{j}``,
``out.{0,2}``, SD-XL style ``label_emb.0.{0,2}``) so that a Stable Diffusion UNet checkpoint
(``model.diffusion_model.*`` minus the prefix) maps key by key onto :class:`UNet`.

``efficient=True`` enables the Imagen Efficient U-Net changes (Saharia et al. 2022): skip connections scaled
by ``1/sqrt(2)``; every level, the first included, downsamples *before* its residual blocks and upsamples
after them, so the levels' residual blocks never run at full resolution (``downsample_factor = 2 ** levels``).
One full-resolution residual block (``full_res_block``) then merges the upsampled features with ``conv_in``'s
output, as imagen-pytorch's ``init_conv_to_final_conv_residual`` + ``final_res_block``: every level runs below
full resolution, so without that path no layer can predict noise pixel by pixel. More residual blocks at low
resolution come from a per-level ``num_res_blocks``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.nn.attention import SpatialTransformer
from t2i.nn.embeddings import TimestepEmbedding, timestep_embedding
from t2i.nn.layers import Upsample, coordinate_grid, group_norm


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block conditioned on the embedding ``emb``.

    The embedding is added after the first conv, or applied as FiLM ``norm(h) * (1 + scale) + shift``
    with ``use_scale_shift_norm`` (ADM). ``up``/``down`` resample inside the block (BigGAN style,
    ``resblock_updown``): nearest x2 / 2x2 average pooling on both branches.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False, num_groups: int = 32,
                 eps: float = 1e-6):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = "up" if up else "down" if down else None
        self.in_layers = nn.Sequential(group_norm(channels, num_groups, eps), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, num_groups, eps), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        if self.resample is None:
            h = conv(act(norm(x)))
        else:
            h = conv(self._resample(act(norm(x))))
            x = self._resample(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = out_rest(out_norm(h + emb_out))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv ``op`` with padding 1 (openaimodel)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class EmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to res blocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    """A setting of every resolution level: one int for all, or one per level (ValueError naming `name` when the
    count is not `levels`)."""
    if isinstance(value, int):
        return [value] * levels
    values = [int(v) for v in value]  # accept Hydra ListConfig
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries but channel_mult has {levels} levels")
    return values


class UNet(nn.Module):
    """Denoiser ``(x, t, context, ...) -> (B, out_channels, H, W)``; see the module docstring for naming.

    Args mirror openaimodel: ``attention_levels`` are the level indices that get SpatialTransformers
    (and the middle block, unless ``middle_attention=False``: a purely convolutional UNet, e.g. a
    super-resolution model trained on crops and sampled at full size, where attention over a larger grid
    than in training would shift its features); heads come from ``num_heads`` (head width ``ch // num_heads``)
    unless ``num_head_channels > 0`` (``ch // num_head_channels`` heads). ``context_dim=None`` gives
    self-attention-only transformers. ``vector_dim`` adds an MLP-projected conditioning vector (pooled text,
    CLIP image embedding, noise-augmentation level...) to the time embedding. ``concat_channels`` extra
    input channels (e.g. the low-res image of a super-resolution stage) are concatenated to ``x``.
    ``coordinate_channels`` appends two more input channels holding each pixel's (y, x) in [-1, 1] (CoordConv,
    Liu et al. 2018): convolutions alone see absolute position only through the zero padding at the border,
    and a text-to-image model must place what the caption says where it says. ``self_attention=False`` keeps
    only the cross-attention in the transformer blocks (Imagen's 256->1024 SR model: trained on crops,
    sampled at full size, still reading the text). ``norm_eps`` is the GroupNorm epsilon of the residual blocks
    and the output norm: Stable Diffusion's (openaimodel ``normalization``, diffusers ``norm_eps``) is 1e-5; the
    transformers' input norms keep 1e-6 as in SD.
    """

    def __init__(self, in_channels: int, out_channels: int, model_channels: int,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int | Sequence[int] = 2,
                 attention_levels: Sequence[int] = (0, 1, 2), num_heads: int = 8, num_head_channels: int = -1,
                 transformer_depth: int | Sequence[int] = 1, context_dim: int | None = None,
                 use_linear_projection: bool = False, vector_dim: int | None = None, concat_channels: int = 0,
                 resblock_updown: bool = False, use_scale_shift_norm: bool = False, dropout: float = 0.0,
                 num_groups: int = 32, gradient_checkpointing: bool = False, efficient: bool = False,
                 middle_attention: bool = True, coordinate_channels: bool = False, self_attention: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must not be empty")
        if num_head_channels <= 0 and num_heads <= 0:
            raise ValueError("set num_heads > 0 or num_head_channels > 0")
        levels = len(channel_mult)
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.channel_mult, self.context_dim, self.vector_dim = channel_mult, context_dim, vector_dim
        self.concat_channels, self.efficient = concat_channels, efficient
        self.coordinate_channels = coordinate_channels
        self.attention_levels = tuple(int(a) for a in attention_levels)
        self.num_res_blocks = per_level(num_res_blocks, levels, "num_res_blocks")
        depths = per_level(transformer_depth, levels, "transformer_depth")
        self.gradient_checkpointing = gradient_checkpointing
        self.downsample_factor = 2 ** (levels if efficient else levels - 1)
        emb_dim = 4 * model_channels

        def heads_for(ch: int) -> tuple[int, int]:
            if num_head_channels > 0:
                if ch % num_head_channels:
                    raise ValueError(f"{ch} channels not divisible by num_head_channels={num_head_channels}")
                return ch // num_head_channels, num_head_channels
            if ch % num_heads:
                raise ValueError(f"{ch} channels not divisible by num_heads={num_heads}")
            return num_heads, ch // num_heads

        def attn(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, context_dim, use_linear_projection=use_linear_projection,
                                      num_groups=num_groups, self_attention=self_attention)

        def res(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(ch, emb_dim, out, dropout, use_scale_shift_norm, num_groups=num_groups, eps=norm_eps, **kw)

        def down(ch: int) -> nn.Module:
            return res(ch, ch, down=True) if resblock_updown else Downsample(ch)

        def up(ch: int) -> nn.Module:
            return res(ch, ch, up=True) if resblock_updown else Upsample(ch)

        self.time_embed = TimestepEmbedding(model_channels, emb_dim)
        self.label_emb = nn.Sequential(TimestepEmbedding(vector_dim, emb_dim)) if vector_dim else None

        conv_in = nn.Conv2d(in_channels + concat_channels + (2 if coordinate_channels else 0), model_channels, 3,
                            padding=1)
        self.input_blocks = nn.ModuleList([EmbedSequential(conv_in)])
        skip_channels, ch = ([] if efficient else [model_channels]), model_channels
        for level, mult in enumerate(channel_mult):
            if efficient:
                self.input_blocks.append(EmbedSequential(down(ch)))
                skip_channels.append(ch)
            for _ in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if level in self.attention_levels:
                    layers.append(attn(ch, depths[level]))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if not efficient and level < levels - 1:
                self.input_blocks.append(EmbedSequential(down(ch)))
                skip_channels.append(ch)

        middle = [res(ch, ch), attn(ch, depths[-1]), res(ch, ch)] if middle_attention else [res(ch, ch), res(ch, ch)]
        self.middle_block = EmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks[level] + 1):
                layers = [res(ch + skip_channels.pop(), channel_mult[level] * model_channels)]
                ch = channel_mult[level] * model_channels
                if level in self.attention_levels:
                    layers.append(attn(ch, depths[level]))
                if (level > 0 or efficient) and i == self.num_res_blocks[level]:
                    layers.append(up(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        # efficient: the one full-resolution block, over [upsampled features, conv_in's features / sqrt(2)]
        self.full_res_block = EmbedSequential(res(ch + model_channels, ch)) if efficient else None
        self.out = nn.Sequential(group_norm(ch, num_groups, norm_eps), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _run(self, block: EmbedSequential, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
             context_mask: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False)
        return block(h, emb, context, context_mask)

    def embed(self, t: torch.Tensor | float, batch: int, device: torch.device,
              vector: torch.Tensor | None = None) -> torch.Tensor:
        """Time embedding (plus the projected conditioning vector) of shape ``(batch, 4 * model_channels)``."""
        t = torch.as_tensor(t, device=device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(-1)
        if t.shape[0] != batch:
            raise ValueError(f"got {t.shape[0]} timesteps for a batch of {batch}")
        weight = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(weight.dtype))
        if self.label_emb is not None:
            if vector is None or vector.shape != (batch, self.vector_dim):
                got = None if vector is None else tuple(vector.shape)
                raise ValueError(f"vector of shape {(batch, self.vector_dim)} required, got {got}")
            emb = emb + self.label_emb(vector.to(weight.dtype))
        elif vector is not None:
            raise ValueError("this UNet takes no conditioning vector (vector_dim=None)")
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, vector: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, in_channels, H, W) with H, W divisible by ``downsample_factor``; ``t`` (B,) or scalar
        timesteps / noise levels; ``context`` (B, L, context_dim) tokens of any length L with optional
        ``context_mask`` (B, L) bool, True = real token; ``vector`` (B, vector_dim); ``concat``
        (B, concat_channels, h, w), bilinearly resized to (H, W) when it differs."""
        b, _, height, width = x.shape
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(f"spatial size {(height, width)} must be divisible by {self.downsample_factor}")
        if self.concat_channels:
            if concat is None or concat.shape[:2] != (b, self.concat_channels):
                raise ValueError(f"concat of shape (B={b}, {self.concat_channels}, h, w) is required")
            if concat.shape[-2:] != x.shape[-2:]:
                concat = F.interpolate(concat, size=(height, width), mode="bilinear", align_corners=False)
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        elif concat is not None:
            raise ValueError("this UNet takes no concat input (concat_channels=0)")
        if self.coordinate_channels:
            x = torch.cat([x, coordinate_grid(x)], dim=1)
        if self.context_dim is None and context is not None:
            raise ValueError("this UNet has no cross-attention (context_dim=None) but a context was given")
        if self.context_dim is not None and context is None:
            raise ValueError(f"a context of shape (B, L, {self.context_dim}) is required")
        if context_mask is not None and context is None:
            raise ValueError("context_mask given without context")

        emb = self.embed(t, b, x.device, vector)
        h, skips = x, []
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context, context_mask)
            if i > 0 or not self.efficient:
                skips.append(h)
            else:
                full_res = h  # conv_in's output
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            skip = skips.pop()
            h = torch.cat([h, skip * (1 / math.sqrt(2)) if self.efficient else skip], dim=1)
            h = self._run(block, h, emb, context, context_mask)
        if self.full_res_block is not None:
            h = self._run(self.full_res_block, torch.cat([h, full_res * (1 / math.sqrt(2))], dim=1), emb, None, None)
        return self.out(h)


class UNetWrapper(nn.Module):
    """Base of the networks that wrap a `UNet` with conditioning adapters (``self.unet``): the stages and
    pipelines read the UNet's sizes through it."""

    unet: UNet

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def downsample_factor(self) -> int:
        return self.unet.downsample_factor


def unet_blocks(network: nn.Module) -> list[nn.Module]:
    """The UNet blocks inside ``network`` (every outermost ``EmbedSequential``: input, middle, output and
    full-resolution blocks), in module order: the units that compile and FSDP work on."""
    blocks, names = [], []
    for name, module in network.named_modules():
        if isinstance(module, EmbedSequential) and not any(name.startswith(n + ".") for n in names):
            blocks.append(module)
            names.append(name)
    return blocks
