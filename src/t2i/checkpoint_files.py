"""Checkpoint files and folders on disk: durable replacement that keeps the previous version, and integrity
checks that unpickle nothing.

A checkpoint is a torch zip file (single device, DDP) or a DeepSpeed ZeRO directory (``latest`` + a tag folder
of zip files, one set per rank). Either is written under a temporary name, fsynced, and put in place by
`replace_keeping_previous`, so that after a crash at any instant (power loss included: file contents and the
renames are on disk before the next step) ``<name>`` or ``<name>.prev`` holds a complete checkpoint.

Nothing here imports torch or DeepSpeed: the checks read zip structure and CRCs only.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

PREVIOUS_SUFFIX = ".prev"
DISCARD_SUFFIX = ".old"  # a version on its way out; removed once the replacement is durable


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (names created, renamed, removed) durable. Some filesystems cannot fsync a
    directory; there the rename is as durable as they make it."""
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


def fsync_tree(path: Path) -> None:
    """fsync every file below `path` (or `path` itself) and every directory, deepest first: another rank may
    have written some of the files, and its writes must be on disk before the folder takes the checkpoint's
    name."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_keeping_previous(new: Path, target: Path, keep_target: bool = True) -> None:
    """Put `new` (a complete checkpoint file or directory, already fsynced) at `target`. The version at `target`
    becomes ``target.prev`` when `keep_target` (pass False for a damaged one: the run resumed from ``.prev``,
    which must then stay); the older ``.prev`` is dropped.

    Every step is a rename, and at each instant ``target`` or ``target.prev`` names a complete checkpoint: a
    directory cannot be hard-linked, so between the two renames only ``.prev`` exists, which
    `t2i.checkpointing.choose_resume_checkpoint` takes. Versions on their way out are renamed to ``.old``
    first and deleted last, so a crash in the middle of a deletion never leaves a half-deleted ``.prev``."""
    prev = previous_path(target)
    discard = target.with_name(target.name + DISCARD_SUFFIX)
    discard_prev = prev.with_name(prev.name + DISCARD_SUFFIX)
    for stale in (discard, discard_prev):  # left by a crash during an earlier replacement
        if stale.exists():
            _remove(stale)
    if target.exists():
        if keep_target:
            if prev.exists():
                os.replace(prev, discard_prev)
            os.replace(target, prev)
        else:
            os.replace(target, discard)
    os.replace(new, target)
    fsync_dir(target.parent)
    for old in (discard, discard_prev):
        if old.exists():
            _remove(old)


def is_zero_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint directory (as Lightning writes it: ``latest`` + a tag folder)."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


DCP_META = "meta.pt"  # Lightning's name for the trainer state inside a distributed checkpoint folder


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A distributed checkpoint folder as Lightning writes it (``.metadata`` + shards + ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def dcp_files_problem(path: Path) -> str | None:
    """None when every file a distributed checkpoint needs is there (shards, index, trainer state)."""
    if not (path / ".metadata").is_file():
        return f"{path}: no .metadata (not a distributed checkpoint, or its save was interrupted)"
    if not (path / DCP_META).is_file():
        return f"{path}: no {DCP_META} (the trainer state; the save was interrupted)"
    if not list(path.glob("*.distcp")):
        return f"{path}: no shard files (*.distcp)"
    return None


def looks_complete(path: str | Path) -> bool:
    """A cheap check, made at every save: `path` is a zip file with its end record, or a ZeRO directory whose
    files all are (a save cut short lacks the end record). `checkpoint_problem` reads every byte instead."""
    path = Path(path)
    if path.is_file():
        return zipfile.is_zipfile(path)
    if is_dcp_checkpoint(path):
        return dcp_files_problem(path) is None
    if not is_zero_checkpoint(path):
        return False
    files = sorted(_zero_tag_dir(path).glob("*.pt"))
    return bool(files) and all(zipfile.is_zipfile(f) for f in files)


def _zero_tag_dir(path: Path) -> Path:
    """The tag folder (one file per rank) that a ZeRO checkpoint's ``latest`` names."""
    return path / (path / "latest").read_text().strip()


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
        if is_dcp_checkpoint(path):
            return dcp_files_problem(path) or _zip_problem(path / DCP_META)
        if not is_zero_checkpoint(path):
            return (f"{path} is a directory but neither a DeepSpeed checkpoint (no 'latest' file) nor a distributed "
                    f"checkpoint (no '.metadata')")
        tag_dir = _zero_tag_dir(path)
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
