"""Single-file CompVis / Stable Diffusion VAE layout for our KL autoencoder (`t2i.nn.autoencoder.AutoencoderKL`).

Our parameter names are CompVis's, so a single-file SD checkpoint only needs its ``first_stage_model.`` prefix
taken off (`compvis_vae_state_dict`) or put on (`prefix_compvis_vae_state_dict`). Our constructor kwargs come
from a CompVis ``first_stage_config`` (`autoencoder_kwargs_from_compvis_config`) or, for a checkpoint without
one, from the weights' shapes (`autoencoder_kwargs_from_compvis_state_dict`); check the weights against them
with `t2i.interop.sd_vae.check_t2i_vae_state_dict`.

Nothing here imports diffusers, Lightning or transformers, or downloads anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from t2i.interop.sd_vae import ATTN_WEIGHT_KEY

__all__ = ["COMPVIS_VAE_PREFIX", "autoencoder_kwargs_from_compvis_config", "autoencoder_kwargs_from_compvis_state_dict",
           "compvis_vae_state_dict", "prefix_compvis_vae_state_dict"]

COMPVIS_VAE_PREFIX = "first_stage_model."


def compvis_vae_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = COMPVIS_VAE_PREFIX,
                           drop_loss: bool = True) -> dict[str, torch.Tensor]:
    """The VAE part of a single-file SD checkpoint: the ``first_stage_model.*`` keys with the prefix removed
    (our names are CompVis's). ``prefix=""`` reads a bare CompVis VAE file (e.g. ``vae-ft-mse-*.ckpt``).
    With `drop_loss`, ``loss.*`` keys (the training loss's LPIPS/discriminator, which some VAE files carry)
    are left out. Mid-attention q/k/v/proj_out weights stored as Linear ``(C, C)`` (some converters write
    them so) are reshaped to our ``(C, C, 1, 1)``. Raises ValueError when no key has `prefix`.
    Check the result against a config with `check_t2i_vae_state_dict`."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        sample = sorted(sd)[:8]
        raise ValueError(f"no VAE weights under {prefix!r} in this checkpoint ({len(sd)} keys, e.g. {sample})")
    if drop_loss:
        out = {k: v for k, v in out.items() if not k.startswith("loss.")}
    for key, value in out.items():
        if ATTN_WEIGHT_KEY.fullmatch(key) and value.dim() == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def prefix_compvis_vae_state_dict(sd: Mapping[str, torch.Tensor],
                                  prefix: str = COMPVIS_VAE_PREFIX) -> dict[str, torch.Tensor]:
    """Our VAE state dict -> the keys a single-file SD checkpoint holds (``first_stage_model.<name>``)."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    return {prefix + k: v for k, v in sd.items()}


_COMPVIS_DDCONFIG = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                     "num_res_blocks", "attn_resolutions", "dropout", "attn_type", "use_linear_attn",
                     "resamp_with_conv", "tanh_out", "give_pre_end"}


def autoencoder_kwargs_from_compvis_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor kwargs from a CompVis ``first_stage_config`` (``{target, params: {embed_dim, ddconfig}}``,
    or its ``params``). CompVis's VAE uses 32-group GroupNorms. Raises ValueError naming what ours cannot
    represent: attention at a resolution level (``attn_resolutions``), ``embed_dim != z_channels``,
    ``double_z: false``, linear/none attention, ``tanh_out``, ``give_pre_end``, unknown ddconfig keys."""
    params = config.get("params", config)
    target = config.get("target")
    if target is not None and not str(target).endswith("AutoencoderKL"):
        raise ValueError(f"first stage target {target!r} is not a KL autoencoder")
    if "ddconfig" not in params:
        raise ValueError(f"not a CompVis first stage config (no params.ddconfig): keys {sorted(config)}")
    dd = dict(params["ddconfig"])
    refused = [f"unknown ddconfig keys {sorted(set(dd) - _COMPVIS_DDCONFIG)}"] if set(dd) - _COMPVIS_DDCONFIG else []
    if list(dd.get("attn_resolutions") or []):
        refused.append(f"attn_resolutions={list(dd['attn_resolutions'])} (ours has attention only in mid)")
    if int(params.get("embed_dim", dd["z_channels"])) != int(dd["z_channels"]):
        refused.append(f"embed_dim={params['embed_dim']} != z_channels={dd['z_channels']}")
    for name, ok in (("double_z", True), ("use_linear_attn", False), ("tanh_out", False),
                     ("give_pre_end", False), ("resamp_with_conv", True)):
        if name in dd and bool(dd[name]) != ok:
            refused.append(f"{name}={dd[name]}")
    if dd.get("attn_type", "vanilla") != "vanilla":
        refused.append(f"attn_type={dd['attn_type']!r}")
    if refused:
        raise ValueError("CompVis first stage config options that t2i's AutoencoderKL cannot represent: "
                         + "; ".join(refused))
    return {"in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
            "base_channels": int(dd["ch"]), "channel_mult": [int(m) for m in dd["ch_mult"]],
            "num_res_blocks": int(dd["num_res_blocks"]), "latent_channels": int(dd["z_channels"]),
            "attn_in_mid": True, "dropout": float(dd.get("dropout", 0.0)), "num_groups": 32}


def autoencoder_kwargs_from_compvis_state_dict(sd: Mapping[str, torch.Tensor],
                                               num_groups: int = 32) -> dict[str, Any]:
    """Our constructor kwargs read off the shapes of a VAE state dict in our (= CompVis) names, for
    single-file checkpoints that come without a config. `num_groups` cannot be read off weights (SD: 32).
    The result still goes through the strict check when loaded."""
    try:
        conv_in = sd["encoder.conv_in.weight"]
        base, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        widths = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        latent = int(sd["post_quant_conv.weight"].shape[0])
        out_channels = int(sd["decoder.conv_out.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"not a CompVis/t2i VAE state dict: no {e.args[0]!r}") from None
    if not levels or levels != list(range(len(levels))) or any(w % base for w in widths):
        raise ValueError(f"cannot read a t2i AutoencoderKL config off this state dict: levels {levels}, "
                         f"widths {widths}, conv_in width {base}")
    return {"in_channels": in_channels, "out_channels": out_channels, "base_channels": base,
            "channel_mult": [w // base for w in widths], "num_res_blocks": len(blocks), "latent_channels": latent,
            "attn_in_mid": "encoder.mid.attn_1.q.weight" in sd, "dropout": 0.0, "num_groups": int(num_groups)}


