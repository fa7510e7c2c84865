"""Stable Diffusion weights as people have them on disk: a single-file CompVis checkpoint (``.safetensors``, or a
``.ckpt`` read with ``weights_only=True``) or a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``),
split into t2i's UNet, VAE and open_clip text-tower state dicts.

Text towers: SD 2.x stores its OpenCLIP ViT-H/14 text tower in open_clip's own names (``cond_stage_model.model.*``);
SD 1.x stores OpenAI's CLIP ViT-L/14 text model in transformers' names (``cond_stage_model.transformer.*``), and
diffusers folders do too (``text_encoder/``): those are renamed to open_clip's names (`hf_clip_text_to_open_clip`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from t2i.weights import load_tensor_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."  # SD 2.x (FrozenOpenCLIPEmbedder)
HF_CLIP_TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1.x (FrozenCLIPEmbedder)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's flat state dict. A file holding more than tensors (arbitrary pickled objects) is
    refused by ``weights_only=True``; a truncated or unreadable file is a clear error."""
    path = Path(path)
    try:
        return load_tensor_file(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # safetensors / zip errors of a damaged file
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e} (truncated or not a checkpoint "
                         f"file?)") from e


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_sd_checkpoint(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor] | None]:
    """``{"unet": CompVis-named UNet, "vae": CompVis-named VAE, "text": open_clip-named text tower or None}`` of a
    single-file SD checkpoint (the EMA copy ``model_ema.*`` is left out; see `sd_unet.compvis_unet_state_dict`)."""
    unet = _strip(sd, UNET_PREFIX)
    vae = _strip(sd, VAE_PREFIX)
    if not unet:
        raise ValueError(f"not a Stable Diffusion checkpoint: no {UNET_PREFIX}* keys (first keys: "
                         f"{sorted(sd)[:5]})")
    if not vae:
        raise ValueError(f"the checkpoint has a UNet but no VAE ({VAE_PREFIX}* keys)")
    text = None
    if any(k.startswith(OPEN_CLIP_TEXT_PREFIX) for k in sd):
        text = _strip(sd, OPEN_CLIP_TEXT_PREFIX)
    elif any(k.startswith(HF_CLIP_TEXT_PREFIX) for k in sd):
        text = hf_clip_text_to_open_clip(_strip(sd, HF_CLIP_TEXT_PREFIX))
    return {"unet": unet, "vae": vae, "text": text}


def hf_clip_text_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in open_clip's text-tower names (q/k/v projections joined into
    ``in_proj``). SD 1.x and diffusers folders hold no ``text_projection`` (Stable Diffusion never uses the pooled
    output); it is then set to the identity, which the UNet never reads. Every key is mapped or it is an error."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"transformers CLIP text model: missing key {name!r}")
        used.add(name)
        return sd[name]

    out["token_embedding.weight"] = take("embeddings.token_embedding.weight")
    out["positional_embedding"] = take("embeddings.position_embedding.weight")
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"transformers CLIP text model: layers {layers} are not 0..N-1")
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([take(f"{src}self_attn.{p}_proj.{kind}")
                                                          for p in ("q", "k", "v")])
            out[f"{dst}attn.out_proj.{kind}"] = take(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = take(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = take(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = take(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = take(f"{src}mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = take(f"final_layer_norm.{kind}")
    if "text_projection.weight" in sd:  # CLIPTextModelWithProjection: y = x W^T; open_clip: y = x @ P
        out["text_projection"] = take("text_projection.weight").t().contiguous()
    else:
        width = out["positional_embedding"].shape[1]
        out["text_projection"] = torch.eye(width, dtype=out["positional_embedding"].dtype)
    leftover = sorted(set(sd) - used)
    if leftover:
        raise ValueError(f"transformers CLIP text model: keys not mapped to open_clip: {leftover[:20]}")
    return out


def read_diffusers_text_encoder(folder: str | Path) -> dict[str, torch.Tensor]:
    """``text_encoder/`` of a diffusers pipeline folder (transformers CLIPTextModel) in open_clip names."""
    folder = Path(folder)
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("hidden_act") not in (None, "quick_gelu", "gelu"):
        raise ValueError(f"{folder}: text encoder activation {config.get('hidden_act')!r} is not supported")
    return hf_clip_text_to_open_clip(read_checkpoint(files[0]))
