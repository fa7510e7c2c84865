"""Derived shards: copies of input shards with computed fields added to every sample (``latent.npy``,
``clip_img.npy``, ...), written by the data_prep scripts.

`derive_shards` writes one output shard per input shard (same name), each atomically (temp name, then
renamed) with a ``<shard>.done.json`` beside it, so an interrupted run resumes where it stopped: finished
shards are skipped. Every original field of a kept sample is copied byte for byte; a sample whose image
(or required caption) cannot be decoded is skipped and counted. The manifest records the provenance
given as ``manifest_meta``.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from t2i.data.decode import BadSample, DecodeConfig, decode_caption, decode_image
from t2i.data.manifest import ShardInfo, load_manifest, write_manifest
from t2i.data.tar_reader import read_samples

# (uint8 images (B, 3, H, W), captions) -> {field name: array (B, ...)}, one row per sample
ComputeFn = Callable[[torch.Tensor, list[str]], dict[str, np.ndarray]]


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_tar_atomic(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for name in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(fields[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(fields[name]))
    tmp.replace(path)


def derive_shard(url: str, n: int, compute: ComputeFn, cfg: DecodeConfig, batch: int, out: Path
                 ) -> tuple[int, int]:
    """Write `out` from the shard at `url` (n samples); returns (kept, skipped)."""
    kept, skipped, pending = [], 0, []

    def flush():
        if not pending:
            return
        new = compute(torch.stack([img for _, _, img, _ in pending]), [cap for *_, cap in pending])
        for i, (key, fields, _, _) in enumerate(pending):
            kept.append((key, {**fields, **{name: npy_bytes(rows[i]) for name, rows in new.items()}}))
        pending.clear()

    for raw in read_samples(url, 0, n):
        if raw.error:
            skipped += 1
            continue
        name = next((f for f in cfg.image_fields if f in raw.fields), None)
        try:
            if name is None:
                raise BadSample("no image")
            pending.append((raw.key, raw.fields, decode_image(raw.fields[name], cfg), decode_caption(raw.fields, cfg)))
        except BadSample:
            skipped += 1
            continue
        if len(pending) == batch:
            flush()
    flush()
    write_tar_atomic(out, kept)
    return len(kept), skipped


def derive_shards(shards: str | Path, out: str | Path, compute: ComputeFn, cfg: DecodeConfig, batch: int,
                  log: Callable[[str], None] = print, **manifest_meta) -> Path:
    """Derive every shard of the manifest `shards` (manifest.json or its folder) into folder `out`; returns
    the new manifest's path. Progress lines go to `log`."""
    manifest = load_manifest(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos, start, total, total_skipped = [], time.time(), 0, 0
    for i, shard in enumerate(manifest.shards):
        target = out / Path(shard.url).name
        done = out / (target.name + ".done.json")
        prefix = f"[{i + 1}/{len(manifest.shards)}] {target.name}:"
        if target.is_file() and done.is_file():
            count = json.loads(done.read_text())["kept"]
            log(f"{prefix} done earlier ({count} samples)")
        else:
            count, skipped = derive_shard(shard.url, shard.num_samples, compute, cfg, batch, target)
            done.write_text(json.dumps({"kept": count, "skipped": skipped}))
            total_skipped += skipped
            log(f"{prefix} {count} samples, {skipped} skipped; {total + count} in all, "
                f"{time.time() - start:.1f}s")
        total += count
        infos.append(ShardInfo(str(target), count))
    path = write_manifest(out, infos, source=str(manifest.source), **manifest_meta)
    log(f"{total} samples ({total_skipped} skipped in this run) in {time.time() - start:.1f}s; manifest: {path}")
    return path
