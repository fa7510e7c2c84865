"""Stable Diffusion UNet weights <-> :class:`t2i.nn.unet.UNet`: the key maps of diffusers and CompVis state dicts.

Our UNet already uses CompVis ``openaimodel.py`` parameter names, so a single-file SD checkpoint only needs its
``model.diffusion_model.`` prefix taken off (:func:`compvis_unet_state_dict`). diffusers'
``UNet2DConditionModel`` names the same modules differently (``down_blocks.{level}.resnets.{j}``,
``mid_block``, ``up_blocks``, ``conv_in``, ``time_embedding.linear_1``, ...); the renaming is built per
configuration from a table of module prefixes (:func:`diffusers_to_t2i_unet_state_dict` and its inverse) and is
a bijection: a missing, unexpected or mis-shaped key is a ``ValueError`` that lists them all, never a partial
load. The transformer sub-modules (``proj_in``, ``transformer_blocks.{k}.attn1.to_q``, ``ff.net.0.proj``...) have
the same names on all three sides.

The diffusers config translation is :mod:`t2i.interop.sd_unet_config`'s; reading and writing diffusers folders
is :mod:`t2i.interop.sd_unet_io`'s.

Nothing here downloads, imports Lightning or needs diffusers installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from t2i.interop.sd_unet_config import as_list, full_unet_kwargs
from t2i.nn.unet import UNet

COMPVIS_UNET_PREFIX = "model.diffusion_model."

# ResBlock (ours) -> ResnetBlock2D (diffusers) sub-module names.
_RESNET_PARTS = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
# 1x1 conv (out, in, 1, 1) and linear (out, in) projections compute the same map: either is accepted.
_PROJ_SUFFIXES = ("proj_in.weight", "proj_out.weight")
_LIST_LIMIT = 40


def _module_table(full: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(our module prefix, diffusers module prefix, is a resnet)`` for every module with parameters."""
    levels = len(full["channel_mult"])
    nrb = [int(n) for n in as_list(full["num_res_blocks"])]
    nrb = nrb * levels if len(nrb) == 1 else nrb
    attention = {int(a) for a in full["attention_levels"]}
    rows = [("time_embed.0.", "time_embedding.linear_1.", False), ("time_embed.2.", "time_embedding.linear_2.", False),
            ("input_blocks.0.0.", "conv_in.", False), ("out.0.", "conv_norm_out.", False),
            ("out.2.", "conv_out.", False),
            ("middle_block.0.", "mid_block.resnets.0.", True), ("middle_block.1.", "mid_block.attentions.0.", False),
            ("middle_block.2.", "mid_block.resnets.1.", True)]
    if full["vector_dim"]:
        rows += [("label_emb.0.0.", "class_embedding.linear_1.", False),
                 ("label_emb.0.2.", "class_embedding.linear_2.", False)]
    block = 1
    for level in range(levels):
        for j in range(nrb[level]):
            rows.append((f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{j}.", True))
            if level in attention:
                rows.append((f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{j}.", False))
            block += 1
        if level < levels - 1:
            rows.append((f"input_blocks.{block}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", False))
            block += 1
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb[level] + 1):
            rows.append((f"output_blocks.{block}.0.", f"up_blocks.{up}.resnets.{j}.", True))
            if level in attention:
                rows.append((f"output_blocks.{block}.1.", f"up_blocks.{up}.attentions.{j}.", False))
            if level > 0 and j == nrb[level]:
                upsampler = 2 if level in attention else 1
                rows.append((f"output_blocks.{block}.{upsampler}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", False))
            block += 1
    return rows


def _t2i_shapes(full: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Our parameter names and shapes for `full` kwargs, from a UNet built on the meta device (no memory)."""
    with torch.device("meta"):
        net = UNet(**full)
    return {k: v.shape for k, v in net.state_dict().items()}


def _key_map(full: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """``{our key: diffusers key}`` (a bijection over our state dict) and our shapes."""
    shapes = _t2i_shapes(full)
    rows = _module_table(full)
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for key in shapes:
        row = max((r for r in rows if key.startswith(r[0])), key=lambda r: len(r[0]), default=None)
        if row is None:
            raise RuntimeError(f"t2i UNet key {key} has no diffusers counterpart (a bug in the module table)")
        ours, theirs, resnet = row
        rest = key[len(ours):]
        if resnet:
            part = next((p for p in _RESNET_PARTS if rest.startswith(p[0])), None)
            if part is None:
                raise RuntimeError(f"t2i UNet resnet key {key} has no diffusers counterpart")
            rest = part[1] + rest[len(part[0]):]
        mapping[key] = theirs + rest
        used.add(ours)
    if len(set(mapping.values())) != len(mapping) or used != {r[0] for r in rows}:
        raise RuntimeError("the t2i <-> diffusers UNet key map is not a bijection (a bug in the module table)")
    return mapping, shapes


def key_listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return f"[{shown}{f', ... and {len(keys) - _LIST_LIMIT} more' if len(keys) > _LIST_LIMIT else ''}]"


def _rename(sd: Mapping[str, Any], key_map: Mapping[str, str], shapes: Mapping[str, torch.Size],
            what: str) -> dict[str, torch.Tensor]:
    """``{key_map[k]: sd[k]}`` in `key_map` order after checking that `sd` holds exactly the keys of `key_map`
    with the `shapes` (given per source key) expected; a 1x1 conv projection given for a linear one (or the
    reverse) is reshaped."""
    missing = [k for k in key_map if k not in sd]
    unexpected = sorted(k for k in sd if k not in key_map)
    bad, out = [], {}
    for key, target in key_map.items():
        if key not in sd:
            continue
        value, shape = sd[key], shapes[key]
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key}: {type(value).__name__}, not a tensor")
            continue
        if value.shape != shape:
            squeezable = key.endswith(_PROJ_SUFFIXES) and value.numel() == shape.numel() and (
                tuple(value.shape) == (*shape, 1, 1) or (*value.shape, 1, 1) == tuple(shape))
            if not squeezable:
                bad.append(f"{key}: {tuple(value.shape)}, expected {tuple(shape)}")
                continue
            value = value.reshape(shape)
        out[target] = value
    if missing or unexpected or bad:
        raise ValueError(f"{what}: the state dict does not match the UNet configuration: "
                         f"{len(missing)} missing keys {key_listing(missing)}, {len(unexpected)} unexpected keys "
                         f"{key_listing(unexpected)}, {len(bad)} shape mismatches {key_listing(bad)}")
    return out


def diffusers_to_t2i_unet_state_dict(sd: Mapping[str, torch.Tensor],
                                     unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict renamed to our UNet's keys (same tensors, no copy).

    `unet_kwargs` are our UNet's (e.g. from :func:`unet_kwargs_from_diffusers_config`). A missing, unexpected
    or mis-shaped key raises a ValueError listing them all."""
    full = full_unet_kwargs(unet_kwargs)
    ours_to_theirs, shapes = _key_map(full)
    theirs_to_ours = {theirs: ours for ours, theirs in ours_to_theirs.items()}
    theirs_shapes = {theirs: shapes[ours] for ours, theirs in ours_to_theirs.items()}
    return _rename(sd, theirs_to_ours, theirs_shapes, "diffusers UNet -> t2i UNet")


def t2i_to_diffusers_unet_state_dict(sd: Mapping[str, torch.Tensor],
                                     unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our UNet's state dict renamed to diffusers ``UNet2DConditionModel`` keys (same tensors, no copy); the
    inverse of :func:`diffusers_to_t2i_unet_state_dict`, with the same checks."""
    full = full_unet_kwargs(unet_kwargs)
    ours_to_theirs, shapes = _key_map(full)
    return _rename(sd, ours_to_theirs, shapes, "t2i UNet -> diffusers UNet")


def compvis_unet_state_dict(sd: Mapping[str, torch.Tensor], unet_kwargs: Mapping[str, Any] | None = None, *,
                            ema: bool = False) -> dict[str, torch.Tensor]:
    """The UNet of a single-file CompVis / Stable Diffusion state dict: its ``model.diffusion_model.*``
    tensors without the prefix (our UNet's names). With ``ema=True`` the EMA copies (``model_ema.<name without
    dots>``) are taken instead. Given `unet_kwargs`, the keys and shapes are checked against our UNet built with
    them (a ValueError listing every missing, unexpected or mis-shaped key)."""
    keys = [k for k in sd if k.startswith(COMPVIS_UNET_PREFIX)]
    if not keys:
        prefixes = sorted({k.split(".", 1)[0] for k in sd})
        raise ValueError(f"no '{COMPVIS_UNET_PREFIX}*' keys: not a CompVis / Stable Diffusion checkpoint "
                         f"(top-level names: {prefixes[:_LIST_LIMIT]})")
    if ema:
        names = {k: "model_ema." + k[len("model."):].replace(".", "") for k in keys}
        absent = sorted(v for v in names.values() if v not in sd)
        if absent:
            raise ValueError(f"ema=True but the checkpoint lacks {len(absent)} EMA tensors {key_listing(absent)}")
        unet = {k[len(COMPVIS_UNET_PREFIX):]: sd[names[k]] for k in keys}
    else:
        unet = {k[len(COMPVIS_UNET_PREFIX):]: sd[k] for k in keys}
    if unet_kwargs is None:
        return unet
    shapes = _t2i_shapes({k: v for k, v in unet_kwargs.items() if not str(k).startswith("_")})
    return _rename(unet, {k: k for k in shapes}, shapes, "CompVis checkpoint -> t2i UNet")


def compvis_checkpoint_state_dict(unet_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`compvis_unet_state_dict`: our UNet's state dict with the ``model.diffusion_model.``
    prefix of a single-file Stable Diffusion checkpoint."""
    return {COMPVIS_UNET_PREFIX + k: v for k, v in unet_sd.items()}
