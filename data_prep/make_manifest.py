"""Write manifest.json for existing tar shards (e.g. img2dataset output: 00000.tar, 00001.tar, ...).

    python data_prep/make_manifest.py data/laion/          # every *.tar in the folder
    python data_prep/make_manifest.py 'data/laion/0*.tar' --trust-stats

Samples are counted from the tar headers; with --trust-stats the "successes" of the
``<shard>_stats.json`` beside a shard is used where present (much faster on remote-mounted data, but
such a shard is not checked for damage). With --sizes each sample's image size is recorded too (from
its json's width/height, as img2dataset writes them, else the image header; no pixels decoded), which
aspect-ratio buckets are planned from. Shards holding no samples are left out. The manifest goes into
the folder (or, for a glob, the common folder of the matches) unless --out says otherwise.

A damaged shard (truncated or corrupt: a cut download, a full disk) does not stop the script: it is
reported with its problem, listed with only the samples the loader can read whole (a shard with none
is left out), and recorded in the manifest's ``"damaged"`` list as {url, readable, problem}. With
--strict any damaged shard is an error instead and no manifest is written.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from t2i.data.decode import IMAGE_FIELDS, image_size_of
from t2i.data.manifest import DataError, ShardInfo, scan_shard, stored_url, write_manifest
from t2i.data.tar_reader import read_samples


def find_shards(target: str) -> tuple[list[Path], Path]:
    """(sorted tar files, default manifest folder) for a folder or a glob pattern."""
    p = Path(target)
    if p.is_dir():
        tars, folder = sorted(p.glob("*.tar")), p
    else:
        tars = sorted(Path(m) for m in glob.glob(target, recursive=True) if m.endswith(".tar"))
        folder = Path(os.path.commonpath([t.resolve().parent for t in tars])) if tars else p.parent
    tars = [t for t in tars if t.is_file()]
    if not tars:
        raise SystemExit(f"no .tar shards found for {target!r}")
    return tars, folder


def stats_successes(tar: Path) -> int | None:
    """img2dataset's `<shard>_stats.json` "successes" count, or None if absent/unusable."""
    stats = tar.with_name(tar.stem + "_stats.json")
    if not stats.is_file():
        return None
    try:
        n = json.loads(stats.read_text(encoding="utf-8")).get("successes")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return n if isinstance(n, int) and n >= 0 else None


def report_damaged(damaged: list[dict]) -> None:
    """One line per damaged shard on stderr: what the manifest keeps of it and why the rest is lost."""
    for d in damaged:
        kept = f"{d['readable']} readable sample(s) kept" if d["readable"] else "left out, no readable sample"
        print(f"damaged shard {d['url']}: {kept}; {d['problem']}", file=sys.stderr)


def shard_sizes(url: str, n: int) -> tuple[tuple[int, int], ...]:
    """(height, width) of the first `n` samples' images, from their json or image headers (no pixels decoded)."""
    fields = frozenset(("json", *IMAGE_FIELDS))
    return tuple(image_size_of(s.fields or {}) for s in read_samples(url, 0, n, fields))


def make_manifest(target: str | Path, trust_stats: bool = False, out: str | Path | None = None,
                  strict: bool = False, sizes: bool = False) -> Path:
    """Count the shards' samples and write `manifest.json`; returns its path. A damaged shard keeps only
    its readable samples and is listed under the manifest's "damaged" (SystemExit instead if `strict`).
    `sizes`: also record each sample's image size, for aspect-ratio buckets (reads every shard once)."""
    tars, folder = find_shards(str(target))
    folder = Path(out) if out else folder
    shards, by_stats, empty, damaged = [], 0, [], []
    for tar in tars:
        n, problem = (stats_successes(tar) if trust_stats else None), None
        if n is None:
            n, problem = scan_shard(tar)
            if problem is not None:
                damaged.append({"url": stored_url(str(tar), folder), "readable": n, "problem": problem})
        else:
            by_stats += 1
        if n == 0:
            if problem is None:
                empty.append(tar.name)
            continue
        shards.append(ShardInfo(str(tar), n, shard_sizes(str(tar), n) if sizes else None))
    report_damaged(damaged)
    if damaged and strict:
        names = ", ".join(d["url"] for d in damaged[:10]) + (" ..." if len(damaged) > 10 else "")
        raise SystemExit(f"error: {len(damaged)} damaged shard(s) (--strict; no manifest written): {names}")
    if not shards:
        raise SystemExit(f"all {len(tars)} shard(s) for {str(target)!r} are empty or unreadable")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"counted_by": {"stats": by_stats, "tar": len(tars) - by_stats}}
    if damaged:
        meta["damaged"] = damaged
    path = write_manifest(folder, shards, **meta)
    total = sum(s.num_samples for s in shards)
    print(f"{path}: {len(shards)} shard(s), {total} samples "
          f"({by_stats} counted from _stats.json, {len(tars) - by_stats} from tar headers)")
    if damaged:
        print(f"{len(damaged)} damaged shard(s) kept with their readable samples only "
              f"(listed under \"damaged\" in {path})")
    if empty:
        print(f"left out {len(empty)} empty shard(s): {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="folder of .tar shards, or a glob (quote it)")
    ap.add_argument("--trust-stats", action="store_true", help="use <shard>_stats.json 'successes' if present")
    ap.add_argument("--out", help="folder to write manifest.json into (default: the shards' folder)")
    ap.add_argument("--strict", action="store_true", help="fail on any damaged shard instead of keeping its "
                                                          "readable samples")
    ap.add_argument("--sizes", action="store_true", help="record each sample's image size (from its json or "
                                                         "image header) for aspect-ratio buckets")
    a = ap.parse_args(argv)
    try:
        make_manifest(a.target, trust_stats=a.trust_stats, out=a.out, strict=a.strict, sizes=a.sizes)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
