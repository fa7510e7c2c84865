"""Weight interop between our KL autoencoder (`t2i.nn.autoencoder.AutoencoderKL`) and Stable Diffusion VAEs.

Three layouts hold the same weights:

- **ours** = **CompVis** (``ldm/modules/diffusionmodules/model.py``): ``encoder.down.N.block.M.*``,
  ``encoder.mid.block_1`` / ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs, shape ``(C, C, 1, 1)``),
  ``norm_out``, ``quant_conv``; the decoder's ``up.N`` is indexed by resolution level, ``up.0`` being the
  full resolution. A single-file SD checkpoint holds them under ``first_stage_model.``
  (`t2i.interop.sd_vae_compvis`).
- **diffusers** ``AutoencoderKL``: ``encoder.down_blocks.N.resnets.M.*`` (``nin_shortcut`` ->
  ``conv_shortcut``), ``mid_block.resnets.{0,1}``, ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,
  to_out.0}`` (Linear, shape ``(C, C)``), ``conv_norm_out``; the decoder's ``up_blocks.0`` is the LOWEST
  resolution, so CompVis ``decoder.up.L`` is diffusers ``decoder.up_blocks.{n_levels - 1 - L}``.

The mapping is derived, per config, from our model's own parameter names (a table ``{ours: diffusers}``,
a bijection checked on construction); every conversion checks the whole state dict first and raises a
``ValueError`` naming every missing key, unexpected key and shape mismatch: nothing is ever loaded partially.
This module holds our constructor kwargs, the diffusers config translation and the key table; diffusers
folders and t2i stage exports are read and written by `t2i.interop.sd_vae_io`.

Numerics are the same on both sides (checked by tests/interop/test_sd_vae.py to <= 1e-5 in fp32): GroupNorm
eps 1e-6 everywhere, single-head mid attention scaled by 1/sqrt(C), nearest x2 upsampling then a 3x3 conv,
stride-2 downsampling after a (0, 1, 0, 1) zero pad, logvar clamped to [-30, 20].

Nothing here imports diffusers, Lightning or transformers, or downloads anything.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from t2i.interop.scheduler import diffusers_version
from t2i.nn.autoencoder import AutoencoderKL

__all__ = [
    "DIFFUSERS_VAE_CLASS",
    "SD_SCALING_FACTOR",
    "autoencoder_kwargs_from_diffusers_config",
    "check_t2i_vae_state_dict",
    "diffusers_config_from_autoencoder_kwargs",
    "diffusers_to_t2i_vae_state_dict",
    "diffusers_vae_key_map",
    "normalize_autoencoder_kwargs",
    "scaling_factor_from_diffusers_config",
    "t2i_to_diffusers_vae_state_dict",
]

DIFFUSERS_VAE_CLASS = "AutoencoderKL"
SD_SCALING_FACTOR = 0.18215  # SD v1/v2 (and diffusers' default when a config has no scaling_factor)
AUTOENCODER_TARGET = "t2i.nn.autoencoder.AutoencoderKL"
_MAX_LISTED = 40


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    if len(keys) <= _MAX_LISTED:
        return str(keys)
    return f"{keys[:_MAX_LISTED]} ... and {len(keys) - _MAX_LISTED} more"


# ---- our constructor kwargs ---------------------------------------------------------------------------
_T2I_PARAMS = {name: p.default for name, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
               if name != "self"}
# constructor options that are not part of the weights or of the eval-mode function (a diffusers config has
# no place for them; diffusers' VAE blocks have dropout 0, which is what our eval mode computes too)
_TRAINING_ONLY = ("dropout", "gradient_checkpointing")


def normalize_autoencoder_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our AutoencoderKL's full constructor kwargs (defaults filled in, ``channel_mult`` a list of ints) from
    `kwargs`, which may be a Hydra node (its ``_target_`` must then be our AutoencoderKL). Unknown keys raise."""
    kwargs = dict(kwargs)
    target = kwargs.pop("_target_", AUTOENCODER_TARGET)
    if target != AUTOENCODER_TARGET:
        raise ValueError(f"autoencoder kwargs name _target_={target!r}, expected {AUTOENCODER_TARGET!r}")
    unknown = sorted(set(kwargs) - set(_T2I_PARAMS))
    if unknown:
        raise ValueError(f"unknown {AUTOENCODER_TARGET} kwargs {unknown} (it takes {sorted(_T2I_PARAMS)})")
    out = {**_T2I_PARAMS, **kwargs}
    out["channel_mult"] = [int(m) for m in out["channel_mult"]]
    for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "latent_channels", "num_groups"):
        out[name] = int(out[name])
    out["attn_in_mid"], out["dropout"] = bool(out["attn_in_mid"]), float(out["dropout"])
    out["gradient_checkpointing"] = bool(out["gradient_checkpointing"])
    return out


def _expected_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of our AutoencoderKL built from `kwargs` (on the meta device: no memory)."""
    with torch.device("meta"):
        model = AutoencoderKL(**normalize_autoencoder_kwargs(kwargs))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: got {tuple(sd[k].shape)}, expected {expected[k]}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k])]
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if missing or unexpected or shapes or not_tensors:
        raise ValueError(f"{what}: missing keys {_listing(missing)}, unexpected keys {_listing(unexpected)}, "
                         f"shape mismatches {_listing(shapes)}"
                         + (f", not tensors {_listing(not_tensors)}" if not_tensors else ""))


def check_t2i_vae_state_dict(sd: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any],
                             what: str = "VAE state dict") -> None:
    """Raise a ValueError naming every missing/unexpected key and shape mismatch of `sd` (our = CompVis names)
    against our AutoencoderKL built from `kwargs`."""
    _check(sd, _expected_shapes(kwargs), f"{what} does not match t2i AutoencoderKL{_brief(kwargs)}")


def _brief(kwargs: Mapping[str, Any]) -> str:
    k = normalize_autoencoder_kwargs(kwargs)
    return (f"(base_channels={k['base_channels']}, channel_mult={k['channel_mult']}, num_res_blocks="
            f"{k['num_res_blocks']}, latent_channels={k['latent_channels']}, attn_in_mid={k['attn_in_mid']})")


# ---- diffusers config <-> our kwargs ------------------------------------------------------------------
_DIFFUSERS_KEYS = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                   "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                   "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                   "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"}
_DIFFUSERS_DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
                       "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
                       "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
                       "scaling_factor": SD_SCALING_FACTOR, "shift_factor": None, "latents_mean": None,
                       "latents_std": None, "force_upcast": True, "use_quant_conv": True,
                       "use_post_quant_conv": True, "mid_block_add_attention": True}


def _diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with diffusers' defaults filled in, after refusing everything our autoencoder cannot represent."""
    config = dict(config)
    cls = config.get("_class_name", DIFFUSERS_VAE_CLASS)
    if cls != DIFFUSERS_VAE_CLASS:
        raise ValueError(f"diffusers config is for _class_name={cls!r}, expected {DIFFUSERS_VAE_CLASS!r}")
    unknown = sorted(k for k in config if k not in _DIFFUSERS_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"diffusers AutoencoderKL config has options this converter does not know: {unknown}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    refused = []
    channels = [int(ch) for ch in c["block_out_channels"]]
    n = len(channels)
    if not channels or any(ch <= 0 for ch in channels):
        refused.append(f"block_out_channels={channels} (must be a non-empty list of positive ints)")
    elif any(ch % channels[0] for ch in channels):
        refused.append(f"block_out_channels={channels}: each must be a multiple of the first (ours is "
                       f"base_channels x channel_mult)")
    groups = int(c["norm_num_groups"])
    if channels and any(ch % groups for ch in channels):
        refused.append(f"norm_num_groups={groups} does not divide every block_out_channels {channels}")
    if list(c["down_block_types"]) != ["DownEncoderBlock2D"] * n:
        refused.append(f"down_block_types={list(c['down_block_types'])} (only {n} x 'DownEncoderBlock2D')")
    if list(c["up_block_types"]) != ["UpDecoderBlock2D"] * n:
        refused.append(f"up_block_types={list(c['up_block_types'])} (only {n} x 'UpDecoderBlock2D')")
    if c["act_fn"] != "silu":
        refused.append(f"act_fn={c['act_fn']!r} (only 'silu')")
    for name in ("use_quant_conv", "use_post_quant_conv"):
        if not c[name]:
            refused.append(f"{name}=False (our AutoencoderKL always has {name[4:]})")
    if c["shift_factor"] not in (None, 0, 0.0):
        refused.append(f"shift_factor={c['shift_factor']} (our latents are mean x latent_scale, no shift)")
    for name in ("latents_mean", "latents_std"):
        if c[name] is not None:
            refused.append(f"{name} set (per-channel latent statistics; ours is a single latent_scale)")
    if refused:
        raise ValueError("diffusers AutoencoderKL config options that t2i's AutoencoderKL cannot represent: "
                         + "; ".join(refused))
    c["block_out_channels"] = channels
    return c


def autoencoder_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our AutoencoderKL's constructor kwargs from a diffusers ``AutoencoderKL`` config.json dict.

    block_out_channels -> base_channels (the first) x channel_mult; layers_per_block -> num_res_blocks;
    mid_block_add_attention -> attn_in_mid; norm_num_groups -> num_groups. Raises ValueError naming the
    options ours cannot represent: block types other than DownEncoderBlock2D/UpDecoderBlock2D, act_fn other
    than silu, use_quant_conv/use_post_quant_conv False, a nonzero shift_factor, latents_mean/latents_std,
    block_out_channels that are not multiples of the first or not divisible by norm_num_groups, unknown keys.
    Accepted and not carried (they do not change the fp32 function): sample_size (tiling), force_upcast (a
    pipeline's fp16 hint). scaling_factor: see `scaling_factor_from_diffusers_config`."""
    c = _diffusers_config(config)
    channels = c["block_out_channels"]
    return {"in_channels": int(c["in_channels"]), "out_channels": int(c["out_channels"]),
            "base_channels": channels[0], "channel_mult": [ch // channels[0] for ch in channels],
            "num_res_blocks": int(c["layers_per_block"]), "latent_channels": int(c["latent_channels"]),
            "attn_in_mid": bool(c["mid_block_add_attention"]), "dropout": 0.0,
            "num_groups": int(c["norm_num_groups"])}


def scaling_factor_from_diffusers_config(config: Mapping[str, Any]) -> float:
    """The config's ``scaling_factor`` (diffusers' default 0.18215 when absent): our export's latent_scale.
    Refuses (ValueError) the same options as `autoencoder_kwargs_from_diffusers_config` (e.g. shift_factor)."""
    return float(_diffusers_config(config)["scaling_factor"])


def diffusers_config_from_autoencoder_kwargs(kwargs: Mapping[str, Any], scaling_factor: float = SD_SCALING_FACTOR,
                                             sample_size: int = 512, force_upcast: bool = True) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config.json dict for our AutoencoderKL built from `kwargs`.

    `scaling_factor`: our export's latent_scale. `sample_size`: diffusers uses it only for tiled
    encode/decode (tile size); `force_upcast`: a pipeline's hint to run the VAE in fp32 under fp16. Raises
    ValueError when `num_groups` does not divide every channel count (ours then uses fewer groups per
    GroupNorm, which diffusers cannot express). ``dropout`` and ``gradient_checkpointing`` are training-only
    options that diffusers' config has no place for (its VAE blocks have dropout 0; eval outputs are equal)."""
    k = normalize_autoencoder_kwargs(kwargs)
    if not k["channel_mult"] or any(m <= 0 for m in k["channel_mult"]):
        raise ValueError(f"channel_mult={k['channel_mult']} must be a non-empty list of positive ints")
    channels = [k["base_channels"] * m for m in k["channel_mult"]]
    bad = [ch for ch in channels if ch % k["num_groups"]]
    if bad:
        raise ValueError(f"num_groups={k['num_groups']} does not divide the channel counts {bad} of "
                         f"{channels}: t2i then uses fewer groups there, which diffusers' norm_num_groups "
                         f"cannot represent")
    n = len(channels)
    return {"_class_name": DIFFUSERS_VAE_CLASS, "_diffusers_version": diffusers_version(),
            "in_channels": k["in_channels"], "out_channels": k["out_channels"],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": channels, "layers_per_block": k["num_res_blocks"], "act_fn": "silu",
            "latent_channels": k["latent_channels"], "norm_num_groups": k["num_groups"],
            "sample_size": int(sample_size), "scaling_factor": float(scaling_factor), "shift_factor": None,
            "latents_mean": None, "latents_std": None, "force_upcast": bool(force_upcast),
            "use_quant_conv": True, "use_post_quant_conv": True,
            "mid_block_add_attention": k["attn_in_mid"]}


# ---- state dict key table ------------------------------------------------------------------------------
def _resnet(leaf: str) -> str:
    return leaf.replace("nin_shortcut.", "conv_shortcut.")


_ATTN_LEAF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTN_WEIGHT_KEY = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")

# our (CompVis) name -> diffusers name; `n` is the number of resolution levels (for the decoder's reversal)
_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]] = [
    (re.compile(r"(quant_conv|post_quant_conv)\.(weight|bias)"), lambda m, n: m[0]),
    (re.compile(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)"), lambda m, n: m[0]),
    (re.compile(r"(encoder|decoder)\.norm_out\.(weight|bias)"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(m[3])}"),
    (re.compile(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (re.compile(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(m[3])}"),
    (re.compile(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (re.compile(r"(encoder|decoder)\.mid\.block_([12])\.(.+)"),
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet(m[3])}"),
    (re.compile(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)"),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTN_LEAF[m[2]]}.{m[3]}"),
]


def _diffusers_name(key: str, n_levels: int) -> str:
    for pattern, rename in _RULES:
        m = pattern.fullmatch(key)
        if m:
            return rename(m, n_levels)
    raise ValueError(f"no diffusers name for t2i AutoencoderKL parameter {key!r}")


def diffusers_vae_key_map(kwargs: Mapping[str, Any]) -> dict[str, str]:
    """``{our (CompVis) name: diffusers name}`` for every parameter of our AutoencoderKL built from `kwargs`."""
    n = len(normalize_autoencoder_kwargs(kwargs)["channel_mult"])
    table = {key: _diffusers_name(key, n) for key in _expected_shapes(kwargs)}
    if len(set(table.values())) != len(table):  # a bug in _RULES, never a user error
        raise RuntimeError("the t2i -> diffusers VAE key table is not one-to-one")
    return table


def _diffusers_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if ATTN_WEIGHT_KEY.fullmatch(key) else shape


_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTN_KEY = re.compile(r"((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)"
                              r"\.(weight|bias)")


def _rename_legacy_attention(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers files (< 0.14, e.g. many hub VAEs) name the attention ``query/key/value/proj_attn``;
    diffusers renames them on load, and so do we. A file holding both spellings of one weight is refused."""
    out: dict[str, torch.Tensor] = {}
    clashes = []
    for key, value in sd.items():
        m = _LEGACY_ATTN_KEY.fullmatch(key)
        new = f"{m[1]}.{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else key
        if new in out or (m and new in sd):
            clashes.append(key)
        out[new] = value
    if clashes:
        raise ValueError(f"diffusers VAE state dict holds both the legacy and the current name of {clashes}")
    return out


def t2i_to_diffusers_vae_state_dict(sd: Mapping[str, torch.Tensor],
                                    kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our (= CompVis) VAE state dict -> diffusers AutoencoderKL's (mid attention 1x1 conv -> Linear weights).
    Raises ValueError listing every missing/unexpected key and shape mismatch; tensors are not copied."""
    check_t2i_vae_state_dict(sd, kwargs, "t2i VAE state dict")
    table = diffusers_vae_key_map(kwargs)
    out = {}
    for key, new in table.items():
        value = sd[key]
        out[new] = value.reshape(value.shape[:2]) if ATTN_WEIGHT_KEY.fullmatch(key) else value
    return out


def diffusers_to_t2i_vae_state_dict(sd: Mapping[str, torch.Tensor],
                                    kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> ours (= CompVis names; Linear attention weights -> 1x1 convs).
    Legacy attention names (query/key/value/proj_attn) are accepted. Raises ValueError listing every
    missing/unexpected key and shape mismatch (against the diffusers model that `kwargs` describes)."""
    sd = _rename_legacy_attention(sd)
    shapes = _expected_shapes(kwargs)
    table = diffusers_vae_key_map(kwargs)
    expected = {new: _diffusers_shape(key, shapes[key]) for key, new in table.items()}
    _check(sd, expected, f"diffusers VAE state dict does not match the AutoencoderKL config{_brief(kwargs)}")
    return {key: sd[new].reshape(shapes[key]) if ATTN_WEIGHT_KEY.fullmatch(key) else sd[new]
            for key, new in table.items()}
