"""Derived shards: copies of input shards with computed fields added to every sample (``latent.npy``,
``clip_img.npy``, ...), written by the data_prep scripts.

`derive_shards` writes one output shard per input shard (same name), each atomically (temp name, then
renamed) with a ``<shard>.done.json`` beside it, so an interrupted run resumes where it stopped: finished
shards are skipped. Every original field of a kept sample is copied byte for byte; a sample whose image
(or required caption) cannot be decoded is skipped and counted. The manifest records the provenance
given as ``manifest_meta``.

With aspect-ratio ``buckets`` every image is resized and centre-cropped to its nearest bucket (chosen from its
size as the training stream chooses it, `t2i.data.buckets`), computed in batches of one bucket, and the sample
gains ``original_size.npy`` and ``crop_top_left.npy`` (SDXL's micro-conditioning of that crop); the manifest
records each sample's size and the bucket set, which training must then use.
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

from t2i.data.buckets import bucket_of
from t2i.data.decode import (
    BadSample,
    DecodeConfig,
    decode_caption,
    decode_image,
    decode_image_to,
    image_size_of,
)
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


def derive_shard(url: str, n: int, compute: ComputeFn, cfg: DecodeConfig, batch: int, out: Path,
                 buckets: list[tuple[int, int]] | None = None) -> tuple[int, int, list[tuple[int, int]]]:
    """Write `out` from the shard at `url` (n samples); returns (kept, skipped, the kept images' sizes)."""
    kept: dict[int, tuple[str, dict]] = {}  # by input order: batches of one bucket finish out of order
    sizes: dict[int, tuple[int, int]] = {}
    skipped, pending = 0, {}  # bucket (None: squares) -> [(index, key, fields, image, caption, extra arrays)]

    def flush(group):
        rows = pending.pop(group, [])
        if not rows:
            return
        new = compute(torch.stack([r[3] for r in rows]), [r[4] for r in rows])
        for i, (index, key, fields, _, _, extra) in enumerate(rows):
            arrays = {**{name: values[i] for name, values in new.items()}, **extra}
            kept[index] = (key, {**fields, **{name: npy_bytes(a) for name, a in arrays.items()}})

    for index, raw in enumerate(read_samples(url, 0, n)):
        if raw.error:
            skipped += 1
            continue
        name = next((f for f in cfg.image_fields if f in raw.fields), None)
        try:
            if name is None:
                raise BadSample("no image")
            caption = decode_caption(raw.fields, cfg)
            if buckets is None:
                group, image, extra = None, decode_image(raw.fields[name], cfg), {}
            else:
                size = image_size_of(raw.fields, cfg.image_fields)
                group = bucket_of(size, buckets)
                image, original, crop = decode_image_to(raw.fields[name], cfg, buckets[group])
                extra = {"original_size.npy": np.array(original, dtype=np.int64),
                         "crop_top_left.npy": np.array(crop, dtype=np.int64)}
                sizes[index] = size if min(size) > 0 else original
        except BadSample:
            skipped += 1
            continue
        pending.setdefault(group, []).append((index, raw.key, raw.fields, image, caption, extra))
        if len(pending[group]) == batch:
            flush(group)
    for group in list(pending):
        flush(group)
    order = sorted(kept)
    write_tar_atomic(out, [kept[i] for i in order])
    return len(order), skipped, [sizes[i] for i in order] if buckets is not None else []


def derive_shards(shards: str | Path, out: str | Path, compute: ComputeFn, cfg: DecodeConfig, batch: int,
                  log: Callable[[str], None] = print, buckets: list[tuple[int, int]] | None = None,
                  **manifest_meta) -> Path:
    """Derive every shard of the manifest `shards` (manifest.json or its folder) into folder `out`; returns
    the new manifest's path. Progress lines go to `log`. ``buckets``: one image size per aspect-ratio bucket
    instead of squares of ``cfg.resolution``."""
    manifest = load_manifest(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos, start, total, total_skipped = [], time.time(), 0, 0
    for i, shard in enumerate(manifest.shards):
        target = out / Path(shard.url).name
        done = out / (target.name + ".done.json")
        prefix = f"[{i + 1}/{len(manifest.shards)}] {target.name}:"
        record = json.loads(done.read_text()) if target.is_file() and done.is_file() else None
        if record is not None and (buckets is None) == ("sizes" not in record):
            count, sizes = record["kept"], record.get("sizes")
            log(f"{prefix} done earlier ({count} samples)")
        else:
            count, skipped, sizes = derive_shard(shard.url, shard.num_samples, compute, cfg, batch, target, buckets)
            done.write_text(json.dumps({"kept": count, "skipped": skipped,
                                        **({"sizes": sizes} if buckets is not None else {})}))
            total_skipped += skipped
            log(f"{prefix} {count} samples, {skipped} skipped; {total + count} in all, "
                f"{time.time() - start:.1f}s")
        total += count
        infos.append(ShardInfo(str(target), count, tuple(tuple(hw) for hw in sizes) if buckets is not None else None))
    if buckets is not None:
        manifest_meta["buckets"] = [list(b) for b in buckets]
    path = write_manifest(out, infos, source=str(manifest.source), **manifest_meta)
    log(f"{total} samples ({total_skipped} skipped in this run) in {time.time() - start:.1f}s; manifest: {path}")
    return path
