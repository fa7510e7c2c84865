"""What every stage pipeline holds: the networks of a stage export, its schedule and prediction kind, and the
frozen text encoder it names; loading helpers for those parts of an export."""

from __future__ import annotations

import torch
from torch import nn

from t2i.diffusion import make_schedule
from t2i.exports import Export
from t2i.pipelines.build import build_from_config, load_module


def vae_export_of(model: dict) -> str | None:
    """The VAE stage export a latent diffusion stage's ``model.target`` names (None for a pixel-space stage)."""
    target = model.get("target") or {}
    return target.get("export") if str(target.get("_target_", "")).endswith(".VaeLatents") else None


def load_net(export: Export, names: tuple[str, ...]) -> nn.ModuleDict:
    """The export's modules ``names`` (each built from ``model.<name>`` and loaded from ``<name>.*``), in eval."""
    return nn.ModuleDict({name: load_module(export, name, name) for name in names}).eval()


def frozen_text_encoder(export: Export) -> nn.Module | None:
    """The frozen text encoder ``model.text_encoder`` names (rebuilt from its config), or None."""
    node = export.config["model"].get("text_encoder")
    if node is None:
        return None
    return build_from_config(node, export.path / "config.yaml", "model.text_encoder").eval()


def text_encoder_of(export: Export) -> tuple[nn.Module | None, nn.Module | None]:
    """(trained, frozen) text encoder of a stage export: one trained with the stage is loaded from the
    export's weights (``text_encoder.*``); a frozen one is rebuilt from its config (a local checkpoint file or
    a CLIP stage export). (None, None) when the stage has no text encoder."""
    node = export.config.get("model", {}).get("text_encoder")
    if not node:
        return None, None
    if any(k.startswith("text_encoder.") for k in export.state_dict()):
        return load_module(export, "text_encoder", "text_encoder"), None
    return None, frozen_text_encoder(export)


class StagePipeline:
    """A trained stage's inference networks (EMA weights), its noise schedule and prediction kind, and the
    frozen text encoder it names; the unCLIP prior, decoder and upsamplers build on it."""

    def __init__(self, net: nn.ModuleDict, alphas_cumprod: torch.Tensor, prediction: str,
                 text_encoder: nn.Module | None = None, config: dict | None = None):
        self.net, self.alphas_cumprod, self.prediction = net, alphas_cumprod, prediction
        self.text_encoder, self.config = text_encoder, config or {}

    @staticmethod
    def _schedule(export: Export) -> tuple[torch.Tensor, str]:
        objective = export.config["model"].get("objective") or {}
        return make_schedule(**objective.get("schedule", {})), objective.get("prediction", "eps")

    def to(self, device):
        for m in (self.net, self.text_encoder):
            if m is not None:
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net["denoiser"].parameters()).device
