"""Rebuild networks from an export's config, safely: only `t2i.` and `torch.` targets may be created
from a config that came with a file (an export may come from anywhere)."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate

from t2i.exports import Export, ExportError

ALLOWED_TARGET_PREFIXES = ("t2i.", "torch.")


def _check_targets(node: Any, where: str) -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGET_PREFIXES):
            raise ExportError(f"{where}: refusing to build {target!r}; exports may only name "
                              f"{' or '.join(ALLOWED_TARGET_PREFIXES)} classes")
        for k, v in node.items():
            _check_targets(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_targets(v, f"{where}[{i}]")


def build_from_config(node: dict, where: str = "config") -> Any:
    _check_targets(node, where)
    return instantiate(node)


def load_module(export: Export, config_key: str, prefix: str) -> torch.nn.Module:
    """Build ``export.config[model][config_key]`` and load the weights stored under ``prefix.``."""
    node = export.config.get("model", {}).get(config_key)
    if node is None:
        raise ExportError(f"{export.path}: its config has no model.{config_key}")
    module = build_from_config(node, f"{export.path}/config.yaml:model.{config_key}")
    state = {k[len(prefix) + 1:]: v for k, v in export.state_dict().items() if k.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{export.path}: weights for {prefix!r} do not match its config: "
                          f"missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    return module.eval().requires_grad_(False)
