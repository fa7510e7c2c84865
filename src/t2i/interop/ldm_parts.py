"""An LDM stage export read back for the exporters of `t2i.interop.diffusers_export`: its UNet, caption dropout,
text encoder, schedule and sampler settings, and the VAE export it names (:class:`LDMParts`, :func:`load_ldm_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from t2i.interop.clip_text_export import DiffusersExportError
from t2i.interop.scheduler import normalize_schedule
from t2i.interop.sd_vae_io import read_vae_export


@dataclass
class LDMParts:
    """Everything of an LDM stage export that the exporters need, built on the CPU in eval mode."""
    export_dir: Path
    config: dict
    unet: nn.Module
    unet_kwargs: dict
    cond_dropout: nn.Module
    text_encoder: nn.Module | None  # an OpenClipTextEncoder (trained jointly or frozen), or None
    text_encoder_problem: str | None  # why text_encoder is None
    vae: nn.Module
    vae_kwargs: dict
    latent_scale: float
    vae_dir: Path
    image_size: int
    schedule: dict
    prediction: str
    sampler: dict

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor


def load_ldm_parts(export_dir: str | Path, vae_export: str | Path | None = None) -> LDMParts:
    """Read an LDM stage export (``denoiser.*``, ``cond_dropout.*``, ``text_encoder.*`` when trained jointly) and
    the VAE export it names (or `vae_export`). A text encoder that cannot be built (e.g. a frozen tower whose
    local checkpoint file is gone) is reported in ``text_encoder_problem``, not raised."""
    from t2i.exports import read_export
    from t2i.pipelines.build import load_module
    from t2i.pipelines.stage_pipeline import text_encoder_of, vae_export_of

    export = read_export(export_dir)
    model = export.config.get("model") or {}
    if "denoiser" not in model:
        raise DiffusersExportError(f"{export_dir} is a {export.stage!r} export without model.denoiser: not an LDM "
                                   f"stage export")
    if vae_export_of(model) is None:
        raise DiffusersExportError(f"{export_dir} is a pixel-space {export.stage!r} stage: a StableDiffusionPipeline "
                                   f"needs a latent diffusion stage with a VAE (model.target.export)")
    vae_dir = Path(vae_export or vae_export_of(model))
    if not vae_dir.is_dir():
        raise DiffusersExportError(f"{export_dir} needs its VAE export {vae_dir}, which is missing (pass vae_export=)")
    unet = load_module(export, "denoiser", "denoiser")
    unet_kwargs = {k: v for k, v in model["denoiser"].items() if not str(k).startswith("_")}
    cond_dropout = load_module(export, "cond_dropout", "cond_dropout")
    text, problem = None, None
    if not model.get("text_encoder"):
        problem = "the stage has no text encoder (model.text_encoder is empty)"
    else:
        try:
            trained, frozen = text_encoder_of(export)
            text = trained if trained is not None else frozen
        except Exception as e:  # noqa: BLE001 - reported in the export's README and CLI output
            problem = f"its text encoder could not be built: {type(e).__name__}: {e}"
    vae, vae_kwargs, scale = read_vae_export(vae_dir)
    if vae.latent_channels != unet.in_channels:
        raise DiffusersExportError(f"{export_dir} denoises {unet.in_channels}-channel latents but the VAE export "
                                   f"{vae_dir} makes {vae.latent_channels}-channel ones (pass vae_export=)")
    objective = model.get("objective") or {}
    return LDMParts(Path(export_dir), export.config, unet.eval(), unet_kwargs, cond_dropout.eval(), text, problem,
                    vae.eval(), vae_kwargs, float(scale), vae_dir, int(model["image_size"]),
                    normalize_schedule(objective.get("schedule")), str(objective.get("prediction", "eps")),
                    dict(model.get("sampler") or {}))
