"""Start a stage's UNet from imported weights (`model.denoiser_init`): a file written by `t2i.cli.import_weights`
(t2i names), a single-file Stable Diffusion checkpoint (``model.diffusion_model.*``) or a diffusers ``unet/``
folder. Loaded strictly: a missing, unexpected or mis-shaped key (an SD 2 UNet into the SD 1 preset, say) is an
error listing them, never a partial load."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from t2i.interop.single_file import UNET_PREFIX, read_checkpoint
from t2i.weights import check_state_dict


def load_unet_weights(unet: nn.Module, source: str | Path) -> None:
    source = Path(source)
    if source.is_dir():
        from t2i.interop.sd_unet_io import load_diffusers_unet
        imported, _ = load_diffusers_unet(source)
        sd = imported.state_dict()
    else:
        sd = read_checkpoint(source)
        if any(k.startswith(UNET_PREFIX) for k in sd):
            sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    check_state_dict(sd, unet, "the configured UNet (is model.denoiser the preset these weights belong to?)", source)
    unet.load_state_dict(sd, strict=True)
