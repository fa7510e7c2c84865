"""open_clip CLIP models without downloads, the one image preprocessing, and a frozen image encoder.

- `clip_spec(arch | config, image_mean, image_std)` resolves what a CLIP is: the open_clip model config
  dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``, ...) of a named open_clip model
  (``open_clip.get_model_config(arch)``, library configs only) or a custom dict, plus the image
  normalisation (the config's ``preprocess_cfg`` or open_clip's OPENAI_DATASET_MEAN/STD).
  `build_clip(spec)` builds the randomly initialised ``open_clip.model.CLIP``; nothing is downloaded.
- `clip_preprocess(images, ...)`: images in [-1, 1] (B, 3, H, W) at any resolution -> the image tower's
  input (bicubic antialiased resize to its ``image_size`` when different, then mean/std). The CLIP stage
  trains through it and `ClipImageEncoder` embeds through it, so training and inference agree.
- `ClipImageEncoder`: the FROZEN image tower -> projected image embedding (B, D), optionally
  L2-normalised; from a CLIP stage export or an open_clip state dict.
- `clip_export_spec(export)` / `clip_export_model_config(export)`: the spec / model config of a CLIP stage
  export (its ``config.yaml`` holds ``model.arch`` or ``model.clip_config``); the text side
  (`OpenClipTextEncoder.from_clip_export`) builds its tower from it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, _build_vision_tower
from torch import nn

from t2i.exports import Export, read_export
from t2i.weights import check_state_dict, load_tensor_file

STAGE = "clip"
_CLIP_KWARGS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                "nonscalar_logit_scale"}


def _plain(obj):
    """A DictConfig/ListConfig (Hydra) or tuple as plain dicts and lists."""
    if hasattr(obj, "_metadata"):  # an OmegaConf container
        from omegaconf import OmegaConf
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class ClipSpec:
    """An open_clip ``CLIP`` config (its constructor's keyword arguments) and the image normalisation."""

    model_config: dict
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def embed_dim(self) -> int:
        return int(self.model_config["embed_dim"])

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model_config["vision_cfg"].get("image_size", CLIPVisionCfg.image_size)
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def context_length(self) -> int:
        return int(self.model_config["text_cfg"].get("context_length", CLIPTextCfg.context_length))


def clip_spec(arch: str | None = None, config: Mapping | None = None,
              image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> ClipSpec:
    """Resolve a named open_clip model (``arch``, e.g. "ViT-B-32") or a custom config dict (exactly one).

    Only open_clip's own ``CLIP`` class with its causal text transformer is supported (no timm or
    Hugging Face towers, CoCa or custom-text models): they could download weights or need other code.
    """
    if (arch is None) == (config is None):
        raise ValueError("give exactly one of arch (a named open_clip model) and config (a custom dict)")
    if arch is not None:
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {arch!r}: only the configs shipped with open_clip are "
                             f"used (open_clip.list_models()); pass a custom config dict instead")
        cfg = open_clip.get_model_config(arch)
    else:
        cfg = copy.deepcopy(_plain(config))
    name = arch or "custom CLIP config"
    pre = cfg.pop("preprocess_cfg", None) or {}
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    pre = {"mean": vision.pop("image_mean", pre.get("mean")), "std": vision.pop("image_std", pre.get("std"))}
    if cfg.pop("custom_text", False) or "multimodal_cfg" in cfg:
        raise ValueError(f"{name}: CustomTextCLIP / CoCa models are not supported, only open_clip's CLIP")
    if vision.get("timm_model_name") or text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ValueError(f"{name}: timm image towers and Hugging Face text towers are not supported")
    if text.get("embed_cls"):
        raise ValueError(f"{name}: text towers with a CLS token (CoCa) are not supported")
    unknown = sorted(set(cfg) - _CLIP_KWARGS)
    if unknown or "embed_dim" not in cfg:
        raise ValueError(f"{name}: config keys {unknown} are not open_clip CLIP arguments "
                         f"(expected {sorted(_CLIP_KWARGS)}; embed_dim is required)")
    for what, fields, got in (("vision_cfg", CLIPVisionCfg, vision), ("text_cfg", CLIPTextCfg, text)):
        bad = sorted(set(got) - set(fields.__dataclass_fields__))
        if bad:
            raise ValueError(f"{name}: unknown {what} keys {bad}")
    cfg.update(vision_cfg=vision, text_cfg=text)
    mean = tuple(float(v) for v in (image_mean or pre["mean"] or OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in (image_std or pre["std"] or OPENAI_DATASET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{name}: image mean/std must be 3 values (std > 0), got {mean} / {std}")
    return ClipSpec(cfg, mean, std)


def build_clip(spec: ClipSpec) -> CLIP:
    """A randomly initialised open_clip ``CLIP`` (open_clip's own init); load weights separately."""
    return CLIP(**copy.deepcopy(spec.model_config))


def clip_preprocess(images: torch.Tensor, image_size: tuple[int, int], mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W), any H x W -> the image tower's input (float32).

    Resized (bicubic, antialiased, clamped to [0, 1] like an 8-bit resize) to ``image_size`` when the
    size differs, then normalised with ``mean``/``std`` (per channel, for pixels in [0, 1])."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float().add(1.0).mul(0.5)
    if tuple(x.shape[-2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def clip_export_spec(export: Export | str | Path) -> ClipSpec:
    """The `ClipSpec` of a CLIP stage export (from ``model.arch`` / ``model.clip_config`` / image mean and
    std in its ``config.yaml``)."""
    if not isinstance(export, Export):
        export = read_export(export, STAGE)
    elif export.stage != STAGE:
        raise ValueError(f"{export.path} is a {export.stage!r} export, expected a {STAGE!r} export")
    m = export.config.get("model") or {}
    return clip_spec(m.get("arch"), m.get("clip_config"), m.get("image_mean"), m.get("image_std"))


def clip_export_model_config(export: Export | str | Path) -> dict:
    """The open_clip model config dict (``CLIP(**config)``) of a CLIP stage export."""
    return copy.deepcopy(clip_export_spec(export).model_config)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


class ClipImageEncoder(nn.Module):
    """The frozen image tower of a CLIP: images in [-1, 1] (B, 3, H, W) -> image embedding (B, D).

    Preprocessing is `clip_preprocess` (the CLIP stage's). ``normalize=True`` returns L2-normalised
    embeddings (what unCLIP's prior and decoder use); `embed(images, normalize=...)` chooses per call.
    Parameters never require grad, the tower stays in eval mode and runs under ``torch.no_grad()``.
    """

    def __init__(self, visual: nn.Module, spec: ClipSpec, normalize: bool = False):
        super().__init__()
        self.visual = visual
        self.image_size, self.mean, self.std = spec.image_size, spec.mean, spec.std
        self.embed_dim = spec.embed_dim
        self.normalize = normalize
        self.visual.requires_grad_(False)
        self.visual.eval()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], spec: ClipSpec, normalize: bool = False,
                        source: str = "state dict") -> ClipImageEncoder:
        """From a full open_clip CLIP state dict (``visual.*`` keys; the text tower's are ignored)."""
        cfg = spec.model_config
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
        sd = strip_prefix(state_dict, "visual.")
        check_state_dict(sd, visual, "the CLIP image tower", source)
        visual.load_state_dict(sd, strict=True)
        return cls(visual, spec, normalize)

    @classmethod
    def from_checkpoint(cls, path: str | Path, arch: str | None = None, config: Mapping | None = None,
                        normalize: bool = False) -> ClipImageEncoder:
        """From a local open_clip checkpoint file of model ``arch`` (or a custom config)."""
        sd = load_tensor_file(path)
        return cls.from_state_dict(sd, clip_spec(arch, config), normalize, source=str(path))

    @classmethod
    def from_clip_export(cls, export_dir: str | Path | Export, normalize: bool = False) -> ClipImageEncoder:
        export = export_dir if isinstance(export_dir, Export) else read_export(export_dir, STAGE)
        return cls.from_state_dict(export.state_dict(), clip_export_spec(export), normalize,
                                   source=str(export.path))

    def train(self, mode: bool = True) -> ClipImageEncoder:
        super().train(mode)
        self.visual.eval()  # frozen forever
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        param = next(self.visual.parameters())
        x = self.preprocess(images.to(param.device)).to(param.dtype)
        emb = self.visual(x).float()
        return F.normalize(emb, dim=-1) if (self.normalize if normalize is None else normalize) else emb

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)
