"""The stage export: what one training stage hands to later stages and to pipelines.

A folder holding ``model.safetensors`` (the weights that inference uses: EMA weights when EMA is on),
``config.yaml`` (the resolved training config) and ``stage.json`` (stage type, metrics, the hash of the
config, the parents' hashes). Reading one never unpickles anything and never imports Lightning.

An export may come from anywhere, and pipelines build networks from the Hydra ``_target_``s of its
config: `check_export_targets` refuses, before anything is imported or called, any target that is not on
the explicit list of `t2i.allowed_targets.MODEL_TARGETS` and any ``${...}`` interpolation (a resolver could
create a node the check never saw). `read_export` runs it on the config's ``model`` section, the part that
pipelines build, and reads a ``model`` of an older layout as today's (`t2i.config_layout`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from t2i.allowed_targets import MODEL_TARGETS, TargetError, check_targets
from t2i.config_layout import upgrade_model_config

FORMAT = "t2i-export/1"
WEIGHTS, CONFIG, STAGE = "model.safetensors", "config.yaml", "stage.json"


class ExportError(RuntimeError):
    """A missing, incomplete or incompatible stage export."""


def check_export_targets(config: Any, source: str | Path, path: str = "") -> list[tuple[str, str]]:
    """Raise `ExportError` (naming the key path, the target and `source`) when `config` names a ``_target_``
    outside `MODEL_TARGETS` anywhere - nested, in lists, ``_partial_`` or not - or holds a ``${...}``
    interpolation; else return every (key path, target) it names. Imports nothing, calls nothing: run it
    before any part of `config` is instantiated. ``path``: where `config` sits in the file (for messages)."""
    try:
        return check_targets(config, source, MODEL_TARGETS, path)
    except TargetError as e:
        raise ExportError(str(e)) from None


@dataclass
class Export:
    path: Path
    stage: str
    config: dict
    info: dict  # the whole stage.json
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def metrics(self) -> dict:
        return self.info.get("metrics", {})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights, read from disk once (pipelines build several modules from one export)."""
        if self._weights is None:
            self._weights = load_file(self.path / WEIGHTS)
        return self._weights


VOLATILE_KEYS = ("ckpt_path",)  # how a run was started, not what it trains


def config_hash(config: dict) -> str:
    """A stable hash of what a config trains (key order and `VOLATILE_KEYS` do not matter)."""
    config = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_export(folder: str | Path, stage: str, state_dict: dict[str, torch.Tensor], config: dict,
                 metrics: dict[str, Any] | None = None, parents: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write an export atomically: into a temp folder, then renamed over any previous one."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, tmp / WEIGHTS)
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    info = {"format": FORMAT, "stage": stage, "config_hash": config_hash(config),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics or {},
            "parents": parents or {}, **(extra or {})}
    (tmp / STAGE).write_text(json.dumps(info, indent=1, default=float) + "\n", encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_export(folder: str | Path, stage: str | None = None) -> Export:
    """Open an export, checking it is complete and (when given) of the expected stage type."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"stage export not found: {folder} (train that stage first)")
    missing = [n for n in (WEIGHTS, CONFIG, STAGE) if not (folder / n).is_file()]
    if missing:
        raise ExportError(f"stage export {folder} is incomplete: missing {', '.join(missing)}")
    try:
        info = json.loads((folder / STAGE).read_text(encoding="utf-8"))
        config = yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ExportError(f"stage export {folder} has an unreadable {STAGE} or {CONFIG}: {e}") from e
    if info.get("format") != FORMAT:
        raise ExportError(f"{folder / STAGE}: format {info.get('format')!r}, expected {FORMAT!r}")
    if stage is not None and info.get("stage") != stage:
        raise ExportError(f"{folder} is a {info.get('stage')!r} export, expected a {stage!r} export")
    if not isinstance(config, dict):
        raise ExportError(f"{folder / CONFIG} does not hold a config mapping")
    if isinstance(config.get("model"), dict):  # an export of an older layout reads as today's
        config = {**config, "model": upgrade_model_config(config["model"])}
    check_export_targets({"model": config.get("model")}, folder / CONFIG)
    return Export(folder, info["stage"], config, info)
