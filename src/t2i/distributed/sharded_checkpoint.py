"""Atomic saves of checkpoint folders that every rank writes into (DeepSpeed ZeRO, FSDP distributed
checkpoints): the ranks write a sibling ``<name>.tmp`` folder, rank 0 syncs it to disk and swaps it in, and the
checkpoint it replaces is kept as ``<name>.prev``. A run killed mid-save leaves the last complete checkpoint."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from t2i.checkpoint_files import fsync_tree, looks_complete, previous_path, replace_keeping_previous


def save_folder_atomically(strategy, filepath, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` on every rank, then swap ``tmp`` in for ``filepath`` keeping the previous version."""
    filepath = Path(strategy.broadcast(str(filepath)))
    tmp = filepath.with_name(filepath.name + ".tmp")
    if strategy.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)
    strategy.barrier("t2i-save-start")
    write(tmp)
    strategy.barrier("t2i-save-written")
    if strategy.is_global_zero:
        fsync_tree(tmp)  # every rank's files, before the folder takes the checkpoint's name
        # a damaged `filepath` (the run resumed from .prev) must not replace the one intact version in .prev
        replace_keeping_previous(tmp, filepath, keep_target=looks_complete(filepath))
    strategy.barrier("t2i-save-done")


def remove_folder_checkpoint(strategy, filepath) -> None:
    if strategy.is_global_zero:
        shutil.rmtree(filepath, ignore_errors=True)
        shutil.rmtree(previous_path(Path(filepath)), ignore_errors=True)
