"""Stable Diffusion UNet weights <-> :class:`t2i.nn.unet.UNet`: diffusers folders and CompVis single files.

Our UNet already uses CompVis ``openaimodel.py`` parameter names, so a single-file SD checkpoint only needs its
``model.diffusion_model.`` prefix taken off (:func:`compvis_unet_state_dict`). diffusers'
``UNet2DConditionModel`` names the same modules differently (``down_blocks.{level}.resnets.{j}``,
``mid_block``, ``up_blocks``, ``conv_in``, ``time_embedding.linear_1``, ...); the renaming is built per
configuration from a table of module prefixes (:func:`diffusers_to_t2i_unet_state_dict` and its inverse) and is
a bijection: a missing, unexpected or mis-shaped key is a ``ValueError`` that lists them all, never a partial
load. The transformer sub-modules (``proj_in``, ``transformer_blocks.{k}.attn1.to_q``, ``ff.net.0.proj``...) have
the same names on all three sides.

Configuration: :func:`unet_kwargs_from_diffusers_config` turns a diffusers ``config.json`` into our
constructor kwargs and refuses, naming them, the options our UNet cannot represent (SD-XL's added
embeddings, class-label embeddings other than ``"projection"``, other block types, ``only_cross_attention``,
...); :func:`diffusers_config_from_unet_kwargs` is the inverse for export. diffusers' ``attention_head_dim``
is, despite its name, the number of heads per level (SD 1.x: ``8``; SD 2.x: ``[5, 10, 20, 20]``, i.e. a
constant head width of 64 = our ``num_head_channels``).

Nothing here downloads, imports Lightning or needs diffusers installed.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t2i.nn.unet import UNet
from t2i.weights import load_tensor_file

COMPVIS_UNET_PREFIX = "model.diffusion_model."
DIFFUSERS_CLASS_NAME = "UNet2DConditionModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"
# written into an exported config.json when diffusers itself is not installed
_FALLBACK_DIFFUSERS_VERSION = "0.30.0"

_DOWN = {False: "DownBlock2D", True: "CrossAttnDownBlock2D"}
_UP = {False: "UpBlock2D", True: "CrossAttnUpBlock2D"}
_MID = "UNetMidBlock2DCrossAttn"

# UNet2DConditionModel.__init__ defaults: what a key missing from an (older) config.json means.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": _MID,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}

# Options our UNet hard-codes: the values it can represent, and what the others would need.
_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "center_input_sample": ((False,), "input rescaling"),
    "flip_sin_to_cos": ((True,), "sin-first timestep embeddings"),
    "freq_shift": ((0,), "a shifted timestep frequency"),
    "downsample_padding": ((1,), "asymmetric downsampling padding"),
    "mid_block_scale_factor": ((1,), "a scaled middle block"),
    "act_fn": (("silu",), "another activation"),
    "encoder_hid_dim": ((None,), "a projection of the encoder hidden states"),
    "encoder_hid_dim_type": ((None,), "a projection of the encoder hidden states"),
    "dual_cross_attention": ((False,), "dual cross-attention"),
    "addition_embed_type": ((None,), "added (SD-XL text_time / image) embeddings"),
    "addition_time_embed_dim": ((None,), "added (SD-XL) time embeddings"),
    "num_class_embeds": ((None,), "a class-label embedding table"),
    "num_attention_heads": ((None,), "num_attention_heads (diffusers itself refuses it)"),
    "resnet_skip_time_act": ((False,), "resnets without the time-embedding activation"),
    "resnet_out_scale_factor": ((1,), "scaled resnet outputs"),
    "time_embedding_type": (("positional",), "Fourier time embeddings"),
    "time_embedding_act_fn": ((None,), "an activation after the time embedding"),
    "timestep_post_act": ((None,), "an activation after the time embedding MLP"),
    "time_cond_proj_dim": ((None,), "a timestep-condition projection (LCM)"),
    "conv_in_kernel": ((3,), "another conv_in kernel size"),
    "conv_out_kernel": ((3,), "another conv_out kernel size"),
    "attention_type": (("default",), "gated (GLIGEN) attention"),
    "class_embeddings_concat": ((False,), "class embeddings concatenated to the time embedding"),
    "mid_block_only_cross_attention": ((None, False), "a cross-attention-only middle block"),
    "cross_attention_norm": ((None,), "a normalised cross-attention context"),
    "reverse_transformer_layers_per_block": ((None,), "per-layer transformer depths in the up blocks"),
    "mid_block_type": ((_MID,), "another middle block"),
    "class_embed_type": ((None, "projection"), "class embeddings other than 'projection'"),
    "resnet_time_scale_shift": (("default", "scale_shift"), "another resnet time conditioning"),
}

# Keys whose value does not change the network we build (``upcast_attention`` only matters in fp16 with
# diffusers' legacy attention processor; its default SDPA processor ignores it, as ours does).
_FREE = {"sample_size", "upcast_attention", "addition_embed_type_num_heads", "dropout"}

# Our UNet options that diffusers' UNet2DConditionModel cannot express (value it must keep, why).
_UNSUPPORTED_OURS: dict[str, tuple[Any, str]] = {
    "efficient": (False, "the Efficient U-Net layout"),
    "resblock_updown": (False, "resampling residual blocks"),
    "middle_attention": (True, "a middle block without attention"),
    "coordinate_channels": (False, "coordinate input channels"),
    "self_attention": (True, "transformer blocks without self-attention"),
    "concat_channels": (0, "a separate concat input (fold it into in_channels yourself)"),
}

# ResBlock (ours) -> ResnetBlock2D (diffusers) sub-module names.
_RESNET_PARTS = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
# 1x1 conv (out, in, 1, 1) and linear (out, in) projections compute the same map: either is accepted.
_PROJ_SUFFIXES = ("proj_in.weight", "proj_out.weight")
_LIST_LIMIT = 40


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_level(value: Any, levels: int, name: str, problems: list[str]) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            problems.append(f"{name}={list(value)} must have one entry per level ({levels})")
            return [value[0]] * levels if value else [None] * levels
        return list(value)
    return [value] * levels


def _uniform(values: list) -> Any:
    """One value for all levels when they agree, else the per-level list."""
    return values[0] if len(set(values)) == 1 else list(values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our :class:`UNet` constructor kwargs equivalent to a diffusers ``UNet2DConditionModel`` ``config.json``.

    Keys absent from `config` take diffusers' defaults; keys starting with ``_`` are metadata. Every option our
    UNet cannot represent (or an unknown key) is collected and reported in one ``ValueError`` naming them.
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = [f"unknown option {k}={cfg[k]!r}" for k in unknown]
    for name, (allowed, what) in _FIXED.items():
        if cfg[name] not in allowed:
            problems.append(f"{name}={cfg[name]!r} ({what}; supported: {', '.join(map(repr, allowed))})")
    if any(_as_list(cfg["only_cross_attention"])):
        problems.append(f"only_cross_attention={cfg['only_cross_attention']!r} (attn1 attending to the context)")

    channels = cfg["block_out_channels"]
    if not channels or not all(_is_int(c) and c > 0 for c in _as_list(channels)):
        raise ValueError(f"unsupported diffusers UNet config: block_out_channels={channels!r}")
    channels = list(channels)
    levels, base = len(channels), channels[0]
    if any(c % base for c in channels):
        problems.append(f"block_out_channels={channels} (each must be a multiple of the first)")
    down = _per_level(cfg["down_block_types"], levels, "down_block_types", problems)
    up = _per_level(cfg["up_block_types"], levels, "up_block_types", problems)
    attention_levels = [i for i, t in enumerate(down) if t == _DOWN[True]]
    bad_down = [t for t in down if t not in _DOWN.values()]
    if bad_down:
        problems.append(f"down_block_types {bad_down} (supported: {sorted(_DOWN.values())})")
    expected_up = [_UP[i in attention_levels] for i in reversed(range(levels))]
    if not bad_down and up != expected_up:
        problems.append(f"up_block_types={up} (must mirror down_block_types: {expected_up})")

    for name in ("in_channels", "out_channels"):
        if not _is_int(cfg[name]) or cfg[name] <= 0:
            problems.append(f"{name}={cfg[name]!r}")
    groups = cfg["norm_num_groups"]
    if not _is_int(groups) or groups <= 0:
        problems.append(f"norm_num_groups={groups!r} (GroupNorm is required)")
    elif any(c % groups for c in channels):
        problems.append(f"norm_num_groups={groups} does not divide block_out_channels={channels}")
    eps = cfg["norm_eps"]
    if not isinstance(eps, (int, float)) or eps <= 0:
        problems.append(f"norm_eps={eps!r}")
    time_dim = cfg["time_embedding_dim"]
    if time_dim is not None and time_dim != 4 * base:
        problems.append(f"time_embedding_dim={time_dim} (ours is 4 * block_out_channels[0] = {4 * base})")

    context = cfg["cross_attention_dim"]
    contexts = _as_list(context)
    if not contexts or not all(_is_int(c) and c > 0 for c in contexts) or len(set(contexts)) != 1:
        problems.append(f"cross_attention_dim={context!r} (one context width is required)")
    num_res_blocks = _per_level(cfg["layers_per_block"], levels, "layers_per_block", problems)
    if not all(_is_int(n) and n > 0 for n in num_res_blocks):
        problems.append(f"layers_per_block={cfg['layers_per_block']!r} (one positive count per level)")
    depths = cfg["transformer_layers_per_block"]
    depth_list = _per_level(depths, levels, "transformer_layers_per_block", problems)
    if not all(_is_int(d) and d > 0 for d in depth_list):
        problems.append(f"transformer_layers_per_block={depths!r} (one positive depth per level)")

    # diffusers' attention_head_dim is the number of heads of each level (its num_attention_heads fallback)
    heads = _per_level(cfg["attention_head_dim"], levels, "attention_head_dim", problems)
    used = sorted(set(attention_levels) | {levels - 1})  # the middle block uses the last level's heads
    head_kwargs: dict[str, int] = {}
    if all(_is_int(heads[i]) and heads[i] > 0 and channels[i] % heads[i] == 0 for i in used):
        dims = {channels[i] // heads[i] for i in used}
        counts = {heads[i] for i in used}
        if isinstance(cfg["attention_head_dim"], (list, tuple)) and len(dims) == 1:
            head_kwargs = {"num_heads": 8, "num_head_channels": dims.pop()}
        elif len(counts) == 1:
            head_kwargs = {"num_heads": counts.pop(), "num_head_channels": -1}
        else:
            problems.append(f"attention_head_dim={cfg['attention_head_dim']!r} (per-level head counts that are "
                            f"neither constant nor a constant head width over block_out_channels={channels})")
    else:
        problems.append(f"attention_head_dim={cfg['attention_head_dim']!r} (heads must divide the channels of "
                        f"every attention level of block_out_channels={channels})")

    vector_dim = None
    if cfg["class_embed_type"] == "projection":
        vector_dim = cfg["projection_class_embeddings_input_dim"]
        if not _is_int(vector_dim) or vector_dim <= 0:
            problems.append(f"projection_class_embeddings_input_dim={vector_dim!r} (required by class_embed_type"
                            f"='projection')")

    if problems:
        raise ValueError("diffusers UNet2DConditionModel config options that t2i's UNet cannot represent: "
                         + "; ".join(problems))
    return {
        "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"], "model_channels": base,
        "channel_mult": [c // base for c in channels], "num_res_blocks": _uniform(num_res_blocks),
        "attention_levels": attention_levels, **head_kwargs, "transformer_depth": _uniform(depth_list),
        "context_dim": contexts[0], "use_linear_projection": bool(cfg["use_linear_projection"]),
        "vector_dim": vector_dim, "use_scale_shift_norm": cfg["resnet_time_scale_shift"] == "scale_shift",
        "dropout": float(cfg["dropout"]), "num_groups": groups, "norm_eps": float(eps),
    }


def _unet_defaults() -> dict[str, Any]:
    params = inspect.signature(UNet.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def _full_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` (``_``-prefixed keys such as Hydra's ``_target_`` ignored) completed with the UNet's defaults;
    every option diffusers cannot express is reported in one ValueError."""
    defaults = _unet_defaults()
    given = {k: v for k, v in kwargs.items() if not str(k).startswith("_")}
    problems = [f"unknown UNet option {k}" for k in sorted(set(given) - set(defaults))]
    missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty and k not in given]
    problems += [f"missing required option {k}" for k in missing]
    full = {**defaults, **given}
    for name, (value, what) in _UNSUPPORTED_OURS.items():
        if name in full and full[name] != value:
            problems.append(f"{name}={full[name]!r} ({what})")
    if full.get("context_dim") is None:
        problems.append("context_dim=None (diffusers' cross-attention blocks need a context width)")
    if not missing:
        levels = len(full["channel_mult"])
        bad = [a for a in full["attention_levels"] if not 0 <= int(a) < levels]
        if bad:
            problems.append(f"attention_levels {bad} outside the {levels} levels")
        groups = int(full["num_groups"])
        channels = [int(full["model_channels"]) * int(m) for m in full["channel_mult"]]
        if any(c % groups for c in channels):  # ours would fall back to fewer groups; diffusers cannot
            problems.append(f"num_groups={groups} does not divide the level widths {channels}")
    if problems:
        raise ValueError("t2i UNet options that diffusers' UNet2DConditionModel cannot represent: "
                         + "; ".join(problems))
    return full


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:  # not installed: any recent version reads the config
        return _FALLBACK_DIFFUSERS_VERSION


def diffusers_config_from_unet_kwargs(kwargs: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` ``config.json`` of our UNet built with `kwargs` (the inverse of
    :func:`unet_kwargs_from_diffusers_config`); `sample_size` is the latent size diffusers pipelines default to.
    Options diffusers cannot express raise a ValueError naming them."""
    full = _full_kwargs(kwargs)
    mults = [int(m) for m in full["channel_mult"]]
    levels, base = len(mults), int(full["model_channels"])
    channels = [base * m for m in mults]
    attention = {int(a) for a in full["attention_levels"]}

    def per_level(value: Any) -> int | list[int]:
        values = [int(v) for v in _as_list(value)]
        return values[0] if len(set(values)) == 1 else values

    if int(full["num_head_channels"]) > 0:
        heads: int | list[int] = [max(1, c // int(full["num_head_channels"])) for c in channels]
    else:
        heads = int(full["num_heads"])
    config = {
        **_DIFFUSERS_DEFAULTS, "_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": _diffusers_version(),
        "sample_size": sample_size, "in_channels": int(full["in_channels"]),
        "out_channels": int(full["out_channels"]),
        "down_block_types": [_DOWN[i in attention] for i in range(levels)],
        "up_block_types": [_UP[i in attention] for i in reversed(range(levels))],
        "block_out_channels": channels, "layers_per_block": per_level(full["num_res_blocks"]),
        "transformer_layers_per_block": per_level(full["transformer_depth"]),
        "attention_head_dim": heads, "cross_attention_dim": int(full["context_dim"]),
        "use_linear_projection": bool(full["use_linear_projection"]), "norm_num_groups": int(full["num_groups"]),
        "norm_eps": float(full["norm_eps"]), "dropout": float(full["dropout"]),
        "resnet_time_scale_shift": "scale_shift" if full["use_scale_shift_norm"] else "default",
    }
    if full["vector_dim"]:
        config.update(class_embed_type="projection", projection_class_embeddings_input_dim=int(full["vector_dim"]))
    return config


def _module_table(full: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(our module prefix, diffusers module prefix, is a resnet)`` for every module with parameters."""
    levels = len(full["channel_mult"])
    nrb = [int(n) for n in _as_list(full["num_res_blocks"])]
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


def _listing(keys: list[str]) -> str:
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
                         f"{len(missing)} missing keys {_listing(missing)}, {len(unexpected)} unexpected keys "
                         f"{_listing(unexpected)}, {len(bad)} shape mismatches {_listing(bad)}")
    return out


def diffusers_to_t2i_unet_state_dict(sd: Mapping[str, torch.Tensor],
                                     unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict renamed to our UNet's keys (same tensors, no copy).

    `unet_kwargs` are our UNet's (e.g. from :func:`unet_kwargs_from_diffusers_config`). A missing, unexpected
    or mis-shaped key raises a ValueError listing them all."""
    full = _full_kwargs(unet_kwargs)
    ours_to_theirs, shapes = _key_map(full)
    theirs_to_ours = {theirs: ours for ours, theirs in ours_to_theirs.items()}
    theirs_shapes = {theirs: shapes[ours] for ours, theirs in ours_to_theirs.items()}
    return _rename(sd, theirs_to_ours, theirs_shapes, "diffusers UNet -> t2i UNet")


def t2i_to_diffusers_unet_state_dict(sd: Mapping[str, torch.Tensor],
                                     unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our UNet's state dict renamed to diffusers ``UNet2DConditionModel`` keys (same tensors, no copy); the
    inverse of :func:`diffusers_to_t2i_unet_state_dict`, with the same checks."""
    full = _full_kwargs(unet_kwargs)
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
            raise ValueError(f"ema=True but the checkpoint lacks {len(absent)} EMA tensors {_listing(absent)}")
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


def _read_diffusers_weights(folder: Path, variant: str | None) -> dict[str, torch.Tensor]:
    infix = f".{variant}" if variant else ""
    for name in (WEIGHTS_NAME, WEIGHTS_NAME_BIN):
        stem, suffix = name.rsplit(".", 1)
        path = folder / f"{stem}{infix}.{suffix}"
        if path.is_file():
            return load_tensor_file(path)
        index = folder / f"{stem}{infix}.{suffix}.index.json"
        if index.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
            weight_map = json.loads(index.read_text())["weight_map"]
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(load_tensor_file(folder / shard))
            absent = sorted(set(weight_map) - set(sd))
            if absent:
                raise ValueError(f"{index} names tensors its shards lack: {_listing(absent)}")
            return sd
    raise FileNotFoundError(f"no {stem}{infix}.safetensors or .bin (or a sharded index) in {folder}")


def load_diffusers_unet(folder: str | Path, *, dtype: torch.dtype | None = torch.float32,
                        variant: str | None = None) -> tuple[UNet, dict[str, Any]]:
    """Our UNet (in eval mode) and its kwargs from a diffusers ``UNet2DConditionModel`` folder: ``config.json``
    + ``diffusion_pytorch_model[.variant].safetensors`` (or ``.bin``, read with ``weights_only=True``, or a
    sharded index). Strict: any config option or key that does not map raises a ValueError. `dtype` casts the
    weights (``None`` keeps the file's)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder} (expected a diffusers UNet folder, e.g. <model>/unet)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", DIFFUSERS_CLASS_NAME) != DIFFUSERS_CLASS_NAME:
        raise ValueError(f"{config_path} describes a {config['_class_name']}, not a {DIFFUSERS_CLASS_NAME}")
    kwargs = unet_kwargs_from_diffusers_config(config)
    sd = diffusers_to_t2i_unet_state_dict(_read_diffusers_weights(folder, variant), kwargs)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        unet = UNet(**kwargs)
    unet.load_state_dict(sd, strict=True, assign=True)
    return unet.eval(), kwargs


def save_diffusers_unet(unet: UNet, kwargs: Mapping[str, Any], folder: str | Path, *,
                        sample_size: int | None = None) -> Path:
    """Write `unet` (built with `kwargs`) as a diffusers ``UNet2DConditionModel`` folder: ``config.json``
    (``_class_name``, ``_diffusers_version``, every option spelled out) + ``diffusion_pytorch_model.safetensors``.
    Returns the folder."""
    from safetensors.torch import save_file

    config = diffusers_config_from_unet_kwargs(kwargs, sample_size=sample_size)
    sd = t2i_to_diffusers_unet_state_dict(unet.state_dict(), kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
