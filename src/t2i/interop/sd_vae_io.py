"""Reading and writing our KL autoencoder (`t2i.nn.autoencoder.AutoencoderKL`) as files: diffusers
``AutoencoderKL`` folders (`load_diffusers_vae`, `save_diffusers_vae`) and t2i ``autoencoder`` stage exports
(`write_vae_export`, `read_vae_export`). The config translation and key renaming are `t2i.interop.sd_vae`'s.

Nothing here imports diffusers, Lightning or transformers, or downloads anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t2i.interop import sd_vae
from t2i.nn.autoencoder import AutoencoderKL

__all__ = ["load_diffusers_vae", "read_vae_export", "save_diffusers_vae", "write_vae_export"]

DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS = "config.json", "diffusion_pytorch_model"
_STAGE_TARGET = "t2i.stages.autoencoder.AutoencoderStage"


# ---- diffusers folders ---------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> AutoencoderKL:
    inner = getattr(model, "autoencoder", model)  # a FrozenAutoencoder from load_autoencoder
    if not isinstance(inner, AutoencoderKL):
        raise TypeError(f"expected t2i.nn.autoencoder.AutoencoderKL (or a FrozenAutoencoder), got "
                        f"{type(model).__name__}")
    return inner


def load_diffusers_vae(folder: str | Path, variant: str | None = None
                       ) -> tuple[AutoencoderKL, dict[str, Any], float]:
    """Our AutoencoderKL (fp32, eval mode) from a diffusers ``AutoencoderKL`` folder: ``config.json`` and
    ``diffusion_pytorch_model[.<variant>].safetensors`` (else ``.bin``, read with ``weights_only=True``).
    Returns ``(model, kwargs, scaling_factor)``. Raises ValueError for a config ours cannot represent and
    for any missing/unexpected key or shape mismatch; FileNotFoundError when a file is missing."""
    from t2i.weights import load_tensor_file

    folder = Path(folder)
    config_path = folder / DIFFUSERS_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"diffusers VAE folder {folder} has no {DIFFUSERS_CONFIG}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    kwargs = sd_vae.autoencoder_kwargs_from_diffusers_config(config)
    scale = sd_vae.scaling_factor_from_diffusers_config(config)
    stem = DIFFUSERS_WEIGHTS + (f".{variant}" if variant else "")
    candidates = [folder / f"{stem}.safetensors", folder / f"{stem}.bin"]
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"diffusers VAE folder {folder} has none of "
                                f"{[p.name for p in candidates]}")
    try:
        sd = sd_vae.diffusers_to_t2i_vae_state_dict(load_tensor_file(weights), kwargs)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    model = AutoencoderKL(**kwargs)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return model.eval(), kwargs, scale


def save_diffusers_vae(model: torch.nn.Module, kwargs: Mapping[str, Any], scaling_factor: float,
                       folder: str | Path, sample_size: int = 512, force_upcast: bool = True) -> Path:
    """Write our AutoencoderKL as a diffusers ``AutoencoderKL`` folder (``config.json`` with ``_class_name:
    AutoencoderKL`` and `scaling_factor`, ``diffusion_pytorch_model.safetensors`` in diffusers' names), which
    ``diffusers.AutoencoderKL.from_pretrained(folder)`` loads. Raises ValueError when the model's weights do
    not match `kwargs` or `kwargs` is not representable (see `diffusers_config_from_autoencoder_kwargs`)."""
    from safetensors.torch import save_file

    config = sd_vae.diffusers_config_from_autoencoder_kwargs(kwargs, scaling_factor, sample_size, force_upcast)
    sd = sd_vae.t2i_to_diffusers_vae_state_dict(_unwrap(model).state_dict(), kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
              str(folder / f"{DIFFUSERS_WEIGHTS}.safetensors"), metadata={"format": "pt"})
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


# ---- t2i VAE stage exports -----------------------------------------------------------------------------
def write_vae_export(model: torch.nn.Module, kwargs: Mapping[str, Any], scaling_factor: float,
                     out_dir: str | Path, source: str) -> Path:
    """Write an imported VAE as a t2i ``autoencoder`` stage export that `t2i.pipelines.autoencoder.
    load_autoencoder` (and the LDM stage's ``first_stage_export``) loads: weights under ``autoencoder.``,
    config ``model.autoencoder`` = our AutoencoderKL node, metrics latent_scale = `scaling_factor`,
    latent_channels, downsample_factor; `source` (where the weights came from) in config and stage.json."""
    from t2i.exports import write_export

    ae = _unwrap(model)
    k = sd_vae.normalize_autoencoder_kwargs(kwargs)
    state = ae.state_dict()
    sd_vae.check_t2i_vae_state_dict(state, k, "model")
    node = {"_target_": sd_vae.AUTOENCODER_TARGET, **{name: v for name, v in k.items() if name != "gradient_checkpointing"}}
    config = {"model": {"_target_": _STAGE_TARGET, "autoencoder": node},
              "imported": {"source": str(source), "latent_scale": float(scaling_factor)}}
    metrics = {"latent_scale": float(scaling_factor), "latent_channels": ae.latent_channels,
               "downsample_factor": ae.downsample_factor}
    return write_export(out_dir, "autoencoder", {f"autoencoder.{n}": v for n, v in state.items()}, config,
                        metrics=metrics, extra={"imported_from": str(source)})


def read_vae_export(export_dir: str | Path) -> tuple[AutoencoderKL, dict[str, Any], float]:
    """``(model, kwargs, latent_scale)`` of a t2i autoencoder stage export (e.g. to `save_diffusers_vae`)."""
    from t2i.exports import read_export
    from t2i.pipelines.autoencoder import load_autoencoder

    frozen = load_autoencoder(export_dir)
    node = dict(read_export(export_dir, stage="autoencoder").config["model"]["autoencoder"])
    return frozen.autoencoder, sd_vae.normalize_autoencoder_kwargs(node), frozen.latent_scale
