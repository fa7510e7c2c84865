"""Generate the built-in "shapes" dataset as WebDataset shards (train + val), deterministically.

    python data_prep/make_shapes.py --out data/shapes --train 50000 --val 2000 --seed 0 \
        --shard-size 5000 --workers 2

Each split goes to OUT/<split>/shard-NNNNNN.tar + manifest.json; samples have fields png, txt, json
and 9-digit keys. Same arguments -> byte-identical shards (whatever --workers). A split whose manifest
already records the same parameters is skipped ("up to date").

The training split never shows the compositions of `t2i.data.shapes.HELD_OUT` (18 of the 162 (shape,
colour, position) triples); the validation split is drawn from every combination, so it holds both seen
and unseen ones. Both manifests record the held-out list under ``params.held_out``.

``--canvases 64x64,64x128,128x64`` (height x width) draws each sample's canvas from the list: the same
compositions on images of several aspect ratios (the positions are the canvas's thirds), for aspect-ratio
buckets. The json then holds ``height`` and ``width`` and the manifest each sample's size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from t2i.data.manifest import MANIFEST_NAME, DataError, ShardInfo, load_manifest, write_manifest
from t2i.data.shapes import (
    GENERATOR_VERSION,
    encode_chunk,
    held_out_combinations,
    random_specs,
    with_canvases,
)
from t2i.data.shard_writer import ShardWriter

SPLITS = ("train", "val")
CHUNK = 250  # specs per unit of pool work


def split_seed(seed: int, split: str) -> int:
    """A per-split seed derived from the base seed (train and val never share samples' randomness)."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def split_params(split: str, num_samples: int, seed: int, shard_size: int,
                 canvases: list[tuple[int, int]] | None = None) -> dict:
    """What determines a split's bytes (stored in the manifest; --workers is deliberately not here)."""
    params = {"dataset": "shapes", "generator_version": GENERATOR_VERSION, "split": split,
              "num_samples": num_samples, "seed": seed, "split_seed": split_seed(seed, split),
              "shard_size": shard_size, "held_out": held_out_combinations(),
              "includes_held_out": split != "train"}
    if canvases:
        params["canvases"] = [list(c) for c in canvases]
    return params


def is_up_to_date(folder: Path, params: dict) -> bool:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("params") != params:
            return False
        return load_manifest(path).total == params["num_samples"]
    except (DataError, json.JSONDecodeError, ValueError, KeyError):
        return False


def clear_split(folder: Path) -> None:
    """Remove a split's manifest first, then its shards (including any left-over temp shards)."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for p in sorted(folder.glob("shard-*.tar")) + sorted(folder.glob("shard-*.tar.tmp")):
        p.unlink()


def write_split(folder: Path, params: dict, workers: int) -> None:
    n = params["num_samples"]
    specs = random_specs(n, params["split_seed"], exclude_held_out=not params["includes_held_out"])
    if params.get("canvases"):
        specs = with_canvases(specs, params["canvases"], params["split_seed"])
    chunks = [specs[i:i + CHUNK] for i in range(0, n, CHUNK)]
    t0, done, report_every = time.perf_counter(), 0, max(params["shard_size"], n // 10, 1)
    pool = mp.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode_chunk, chunks) if pool else map(encode_chunk, chunks)
        with ShardWriter(folder, max_count=params["shard_size"], params=params) as writer:
            for samples in results:
                for fields in samples:
                    writer.write(f"{done:09d}", fields)
                    done += 1
                    if done % report_every == 0 or done == n:
                        print(f"  {params['split']}: {done}/{n} samples, {time.perf_counter() - t0:.1f}s",
                              flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    if params.get("canvases"):  # each sample's size, for aspect-ratio buckets
        manifest, start, infos = load_manifest(folder), 0, []
        for shard in manifest.shards:
            infos.append(ShardInfo(shard.url, shard.num_samples,
                                   tuple(s.canvas for s in specs[start:start + shard.num_samples])))
            start += shard.num_samples
        write_manifest(folder, infos, params=params)


def make_shapes(out: str | Path, train: int = 50000, val: int = 2000, seed: int = 0,
                shard_size: int = 5000, workers: int = 2,
                canvases: list[tuple[int, int]] | None = None) -> dict[str, str]:
    """Write OUT/train and OUT/val; returns {split: "written" | "up to date" | "empty"}."""
    if shard_size < 1 or train < 0 or val < 0 or workers < 1:
        raise ValueError("shard_size and workers must be >= 1, train and val >= 0")
    out, status = Path(out), {}
    for split, n in (("train", train), ("val", val)):
        folder = out / split
        params = split_params(split, n, seed, shard_size, canvases)
        if n == 0:
            status[split] = "empty"
            print(f"{split}: 0 samples requested, skipped")
            continue
        if is_up_to_date(folder, params):
            status[split] = "up to date"
            print(f"{split}: up to date ({folder})")
            continue
        t0 = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        clear_split(folder)
        print(f"{split}: writing {n} samples to {folder} (seed {params['split_seed']}, {workers} worker(s))",
              flush=True)
        write_split(folder, params, workers)
        status[split] = "written"
        print(f"{split}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return status


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/shapes", help="output folder (gets train/ and val/)")
    ap.add_argument("--train", type=int, default=50000, help="number of training samples")
    ap.add_argument("--val", type=int, default=2000, help="number of validation samples")
    ap.add_argument("--seed", type=int, default=0, help="base seed (train/val seeds are derived)")
    ap.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    ap.add_argument("--workers", type=int, default=2, help="rendering processes")
    ap.add_argument("--canvases", default=None, help="HxW,HxW,...: canvases to draw from (default: 64x64 only)")
    a = ap.parse_args(argv)
    canvases = [tuple(int(v) for v in c.split("x")) for c in a.canvases.split(",")] if a.canvases else None
    t0 = time.perf_counter()
    make_shapes(a.out, train=a.train, val=a.val, seed=a.seed, shard_size=a.shard_size, workers=a.workers,
                canvases=canvases)
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
