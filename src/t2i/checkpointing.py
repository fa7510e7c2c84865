"""Checkpoints on disk: written atomically, checked before a resume, tagged with the stage that wrote them.

- `AtomicCheckpointIO` (Lightning's CheckpointIO for single-device and DDP runs) writes ``<name>.tmp``, fsyncs
  it and renames it over ``<name>``; the previous version is kept as ``<name>.prev``. A crash while saving
  leaves the old ``last.ckpt`` whole. DeepSpeed writes directories; `t2i.distributed.deepspeed` swaps those in
  the same way.
- `checkpoint_problem` reads a checkpoint's structure without unpickling anything (zip CRCs of every member),
  so a truncated or corrupt file is found before Lightning half-restores a run from it.
- `choose_resume_checkpoint` picks ``last.ckpt``, or its ``.prev`` when ``last.ckpt`` is damaged (saying so).
- `stage_tag` / `check_stage_tag`: every checkpoint records which stage class and stage name wrote it; resuming a
  stage from another stage type's checkpoint is a clear error instead of a page of missing keys.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from t2i.distributed.deepspeed import is_zero_checkpoint, zero_client_state

log = logging.getLogger("t2i.checkpoint")

TAG_KEY = "t2i"
PREVIOUS_SUFFIX = ".prev"


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
        if self.keep_previous and path.is_file() and zipfile.is_zipfile(path):
            prev = path.with_name(path.name + PREVIOUS_SUFFIX)
            prev_tmp = prev.with_name(prev.name + ".tmp")
            prev_tmp.unlink(missing_ok=True)
            os.link(path, prev_tmp)  # a second name for the old file: `path` exists at every instant
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        path.unlink(missing_ok=True)
        path.with_name(path.name + PREVIOUS_SUFFIX).unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{path} is not a complete checkpoint file ({type(e).__name__}: {e}); it is truncated or corrupt"
    return f"{path}: member {bad} fails its CRC check (corrupt file)" if bad else None


def checkpoint_problem(path: str | Path) -> str | None:
    """None when `path` is a structurally intact checkpoint (a torch zip file, or a ZeRO directory whose files
    all are), else what is wrong with it. Nothing is unpickled."""
    path = Path(path)
    if path.is_dir():
        if not is_zero_checkpoint(path):
            return f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest' file)"
        tag_dir = path / (path / "latest").read_text().strip()
        files = sorted(tag_dir.glob("*.pt"))
        if not files:
            return f"{tag_dir}: no checkpoint files (the save was interrupted)"
        for f in files:
            problem = _zip_problem(f)
            if problem:
                return problem
        return None
    if not path.is_file():
        return f"{path} does not exist"
    if path.stat().st_size == 0:
        return f"{path} is empty (0 bytes)"
    return _zip_problem(path)


def choose_resume_checkpoint(last: Path) -> Path | None:
    """``last.ckpt`` when intact; else its previous version (``last.ckpt.prev``) with a warning; None when neither
    exists. A damaged checkpoint with no intact previous one is an error (never a silent fresh start)."""
    prev = last.with_name(last.name + PREVIOUS_SUFFIX)
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
    if path.is_dir():
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
