"""Rebuild networks from an export's config, safely: an export may come from anywhere, so every
``_target_`` of a node is checked before the node is instantiated.

`t2i.exports.check_export_targets` refuses every name that is not on the explicit list of
`t2i.allowed_targets.MODEL_TARGETS` without importing anything; `resolve_export_target` then imports what a
listed name stands for, checking that it is a class or function."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from hydra.utils import instantiate

from t2i.allowed_targets import MODEL_TARGETS
from t2i.exports import Export, ExportError, check_export_targets


def resolve_export_target(name: str, where: str) -> Any:
    """The class or function that the ``_target_`` `name` stands for, or an `ExportError` naming `where` when
    it is not on `MODEL_TARGETS` or cannot be found."""
    if name not in MODEL_TARGETS:
        raise ExportError(f"{where}: refusing to build {name!r}: not one of the classes and functions a stage "
                          f"export may name (t2i.allowed_targets.MODEL_TARGETS)")
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for part in parts[split:]:
                obj = getattr(obj, part)
        except AttributeError:
            break
        if callable(obj):
            return obj
        break
    raise ExportError(f"{where}: cannot find {name!r}; was the export written by another t2i version (or with a "
                      f"package that is not installed here)?")


def build_from_config(node: dict, source: Any, path: str) -> Any:
    """Instantiate `node`, the part `path` (e.g. ``model.denoiser``) of the config file `source`, after
    checking every ``_target_`` in it."""
    for where, target in check_export_targets(node, source, path):
        resolve_export_target(target, f"{source}: {where}")
    return instantiate(node)


def check_text_width(denoiser: torch.nn.Module, text_encoder: torch.nn.Module | None, source: Any) -> None:
    """A frozen text encoder is rebuilt from what the export names (a CLIP export, a checkpoint file), which
    may have changed since the stage was trained: refuse one whose token width is not the denoiser's."""
    want = getattr(denoiser, "context_dim", None) or getattr(denoiser, "text_width", None)
    width = getattr(text_encoder, "width", None)
    if text_encoder is not None and want and width is not None and width != want:
        raise ExportError(f"{source}: its denoiser was trained on {want}-wide text token states, but the text "
                          f"encoder its config names gives {width}-wide ones (was that CLIP export or checkpoint "
                          f"replaced since?); retrain this stage on the current text encoder")


def load_module(export: Export, config_key: str, prefix: str) -> torch.nn.Module:
    """Build ``export.config[model][config_key]`` and load the weights stored under ``prefix.``."""
    node = export.config.get("model", {}).get(config_key)
    if node is None:
        raise ExportError(f"{export.path}: its config has no model.{config_key}")
    module = build_from_config(node, export.path / "config.yaml", f"model.{config_key}")
    state = {k[len(prefix) + 1:]: v for k, v in export.state_dict().items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: weights {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ExportError(f"{export.path}: the weights for {prefix!r} do not match its config.yaml (model."
                          f"{config_key}): missing {missing[:8]}, unexpected {unexpected[:8]}, shape mismatches "
                          f"{shapes[:8]}; was config.yaml edited, or mixed with another export's weights?")
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)
