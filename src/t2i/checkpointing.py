"""Checkpoints on disk: written atomically, checked before a resume, tagged with the stage that wrote them.

- `AtomicCheckpointIO` (Lightning's CheckpointIO for single-device and DDP runs) writes ``<name>.tmp``, fsyncs
  it and renames it over ``<name>``; the previous version is kept as ``<name>.prev``. A crash while saving
  leaves the old ``last.ckpt`` whole. DeepSpeed writes directories; `t2i.distributed.deepspeed` puts those in
  place with `t2i.checkpoint_files.replace_keeping_previous`, keeping ``.prev`` the same way.
- `t2i.checkpoint_files.checkpoint_problem` reads a checkpoint's structure without unpickling anything (zip
  CRCs of every member), so a truncated or corrupt file is found before Lightning half-restores a run from it.
- `choose_resume_checkpoint` picks ``last.ckpt``, or its ``.prev`` when ``last.ckpt`` is damaged (saying so).
- `stage_tag` / `check_stage_tag`: every checkpoint records which stage class and stage name wrote it; resuming a
  stage from another stage type's checkpoint is a clear error instead of a page of missing keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from t2i.checkpoint_files import (
    checkpoint_problem,
    fsync_dir,
    is_dcp_checkpoint,
    looks_complete,
    previous_path,
)
from t2i.distributed.deepspeed import zero_client_state
from t2i.distributed.fsdp import dcp_client_state

log = logging.getLogger("t2i.checkpoint")

TAG_KEY = "t2i"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (damaged, or written by another stage)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, fsync, keep the previous version as ``.prev``, rename into place."""

    def __init__(self, keep_previous: bool = True):
        self.keep_previous = keep_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed save (full disk, unpicklable object) leaves no partial file
            raise
        # a damaged `path` (the run resumed from .prev) must not replace the one intact version in .prev
        if self.keep_previous and path.is_file() and looks_complete(path):
            prev = previous_path(path)
            prev_tmp = prev.with_name(prev.name + ".tmp")
            prev_tmp.unlink(missing_ok=True)
            os.link(path, prev_tmp)  # a second name for the old file: `path` exists at every instant
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        path.unlink(missing_ok=True)
        previous_path(path).unlink(missing_ok=True)


def choose_resume_checkpoint(last: Path) -> Path | None:
    """``last.ckpt`` when intact; else its previous version (``last.ckpt.prev``) with a warning; None when neither
    exists. A damaged checkpoint with no intact previous one is an error (never a silent fresh start)."""
    prev = previous_path(last)
    problems = []
    for candidate in (last, prev):
        if not candidate.exists():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            if problems:
                log.warning("%s; resuming from the previous checkpoint %s instead", problems[0], candidate)
                print(f"[t2i] WARNING: {problems[0]}; resuming from the previous checkpoint {candidate}")
            return candidate
        problems.append(problem)
    if problems:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(problems) +
                              ". Delete the damaged files to start the stage from scratch.")
    return None


def stage_tag(module: torch.nn.Module) -> dict:
    """What a checkpoint records about the stage that wrote it."""
    cls = type(module)
    return {"stage_class": f"{cls.__module__}.{cls.__qualname__}", "stage": getattr(module, "stage_name", None)}


def read_stage_tag(path: str | Path) -> dict | None:
    """The stage tag of a checkpoint file or ZeRO directory (None for checkpoints written before tags existed).
    Read with ``weights_only=True`` and memory-mapped, so large checkpoints cost little."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        state = dcp_client_state(path)
    elif path.is_dir():
        state = zero_client_state(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path} (loaded with weights_only=True): {e}") from e
    return state.get(TAG_KEY) if isinstance(state, dict) else None


def check_stage_tag(path: str | Path, module: torch.nn.Module) -> None:
    """Refuse to resume `module` from a checkpoint that another type of stage wrote."""
    saved = read_stage_tag(path)
    if saved is None:
        return
    now = stage_tag(module)
    if saved.get("stage_class") != now["stage_class"] or saved.get("stage") != now["stage"]:
        raise CheckpointError(
            f"checkpoint {path} was written by a {saved.get('stage')!r} stage ({saved.get('stage_class')}); this run "
            f"trains a {now['stage']!r} stage ({now['stage_class']}). Point ckpt_path at a checkpoint of this stage, "
            f"or give this run its own run_dir.")
