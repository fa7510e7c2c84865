"""Rebuild networks from an export's config, safely: an export may come from anywhere, so every
``_target_`` of a node is checked before the node is instantiated.

`t2i.exports.check_export_targets` refuses names outside ``t2i.``/``torch.`` without importing anything;
`resolve_export_target` then follows each name (importing only t2i and torch modules) and refuses one
that leaves them on the way (``torch.os.system`` is ``os.system``) or lands outside what a stage
export is made of: t2i's networks, conditioning, diffusion, losses and stages, and torch classes
(``torch.save`` or ``torch.load`` are functions: a config could overwrite a file or unpickle one)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from hydra.utils import instantiate

from t2i.exports import Export, ExportError, check_export_targets

T2I_TARGET_PACKAGES = ("t2i.nn", "t2i.conditioning", "t2i.diffusion", "t2i.losses", "t2i.stages")


def _home(obj: Any) -> str:
    """The module that defines `obj` (a module's own name)."""
    return obj.__name__ if inspect.ismodule(obj) else str(getattr(obj, "__module__", None) or "?")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def resolve_export_target(name: str, where: str) -> Any:
    """The object that the ``_target_`` `name` (already passed by `check_export_targets`) stands for, or an
    `ExportError` naming `where` when it is not something a stage export may build."""
    parts = name.split(".")

    def refuse(why: str) -> ExportError:
        return ExportError(f"{where}: refusing to build {name!r}: {why}; a stage export may only name "
                           f"torch classes and the classes and functions of {', '.join(T2I_TARGET_PACKAGES)}")

    try:
        obj = importlib.import_module(parts[0])
        for i in range(1, len(parts)):
            try:
                obj = getattr(obj, parts[i])
            except AttributeError:  # a submodule not imported yet (the name is inside t2i or torch)
                obj = importlib.import_module(".".join(parts[: i + 1]))
            if not _within(_home(obj), ("t2i", "torch")):
                raise refuse(f"{'.'.join(parts[: i + 1])} is {_home(obj)}'s, not t2i's or torch's")
    except ImportError as e:
        raise ExportError(f"{where}: cannot find {name!r} ({e}); was the export written by another t2i "
                          f"version?") from None
    home = _home(obj)
    if inspect.ismodule(obj) or not callable(obj):
        raise refuse("it is not a class or function")
    if _within(home, ("torch",)) and not inspect.isclass(obj):
        raise refuse(f"it is a torch function ({home})")
    if _within(home, ("t2i",)) and not _within(home, T2I_TARGET_PACKAGES):
        raise refuse(f"it is defined in {home}")
    return obj


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
