"""diffusers ``UNet2DConditionModel`` configs <-> :class:`t2i.nn.unet.UNet` constructor kwargs.

:func:`unet_kwargs_from_diffusers_config` turns a diffusers ``config.json`` into our constructor kwargs and
refuses, naming them, the options our UNet cannot represent (SD-XL's added embeddings, class-label embeddings
other than ``"projection"``, other block types, ``only_cross_attention``, ...);
:func:`diffusers_config_from_unet_kwargs` is the inverse for export. diffusers' ``attention_head_dim`` is,
despite its name, the number of heads per level (SD 1.x: ``8``; SD 2.x: ``[5, 10, 20, 20]``, i.e. a constant
head width of 64 = our ``num_head_channels``).

Nothing here downloads, imports Lightning or needs diffusers installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from t2i.interop.scheduler import diffusers_version
from t2i.nn.unet import UNet

DIFFUSERS_CLASS_NAME = "UNet2DConditionModel"

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

# Our UNet options that diffusers' UNet2DConditionModel cannot express (value it must keep, why).
_UNSUPPORTED_OURS: dict[str, tuple[Any, str]] = {
    "efficient": (False, "the Efficient U-Net layout"),
    "resblock_updown": (False, "resampling residual blocks"),
    "middle_attention": (True, "a middle block without attention"),
    "coordinate_channels": (False, "coordinate input channels"),
    "self_attention": (True, "transformer blocks without self-attention"),
    "concat_channels": (0, "a separate concat input (fold it into in_channels yourself)"),
}


def as_list(value: Any) -> list:
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
    if any(as_list(cfg["only_cross_attention"])):
        problems.append(f"only_cross_attention={cfg['only_cross_attention']!r} (attn1 attending to the context)")

    channels = cfg["block_out_channels"]
    if not channels or not all(_is_int(c) and c > 0 for c in as_list(channels)):
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
    contexts = as_list(context)
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


def full_unet_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
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


def diffusers_config_from_unet_kwargs(kwargs: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` ``config.json`` of our UNet built with `kwargs` (the inverse of
    :func:`unet_kwargs_from_diffusers_config`); `sample_size` is the latent size diffusers pipelines default to.
    Options diffusers cannot express raise a ValueError naming them."""
    full = full_unet_kwargs(kwargs)
    mults = [int(m) for m in full["channel_mult"]]
    levels, base = len(mults), int(full["model_channels"])
    channels = [base * m for m in mults]
    attention = {int(a) for a in full["attention_levels"]}

    def per_level(value: Any) -> int | list[int]:
        values = [int(v) for v in as_list(value)]
        return values[0] if len(set(values)) == 1 else values

    if int(full["num_head_channels"]) > 0:
        heads: int | list[int] = [max(1, c // int(full["num_head_channels"])) for c in channels]
    else:
        heads = int(full["num_heads"])
    config = {
        **_DIFFUSERS_DEFAULTS, "_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": diffusers_version(),
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
