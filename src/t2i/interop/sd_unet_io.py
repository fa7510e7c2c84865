"""diffusers ``UNet2DConditionModel`` folders <-> :class:`t2i.nn.unet.UNet`: ``config.json`` plus
``diffusion_pytorch_model[.variant].safetensors`` (or ``.bin``, or a sharded index).

The config translation is :mod:`t2i.interop.sd_unet_config`'s, the key renaming :mod:`t2i.interop.sd_unet`'s.
Nothing here downloads, imports Lightning or needs diffusers installed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t2i.interop.sd_unet import (
    diffusers_to_t2i_unet_state_dict,
    key_listing,
    t2i_to_diffusers_unet_state_dict,
)
from t2i.interop.sd_unet_config import (
    DIFFUSERS_CLASS_NAME,
    diffusers_config_from_unet_kwargs,
    unet_kwargs_from_diffusers_config,
)
from t2i.nn.unet import UNet
from t2i.weights import load_tensor_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"


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
                raise ValueError(f"{index} names tensors its shards lack: {key_listing(absent)}")
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
