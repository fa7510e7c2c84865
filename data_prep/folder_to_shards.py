"""Pack a folder of captioned images into WebDataset shards in the img2dataset layout.

    python data_prep/folder_to_shards.py IMAGES/ --out data/mine [--captions caps.csv|caps.jsonl]

Captions come from a sidecar ``<name>.txt`` beside each image, or from ``--captions``: a CSV with
columns path,caption or a JSONL file of {"path", "caption"} (paths relative to the folder or
absolute). Each sample is ``{key}.jpg|png|webp`` (the original bytes; the extension follows the real
format PIL detects; other formats such as GIF/BMP/TIFF are converted to PNG), ``{key}.txt`` and
``{key}.json`` (key, caption, path, width, height). The folder is walked recursively in sorted order.
Files PIL cannot decode and images without a caption are skipped, counted and reported.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from PIL import Image

from t2i.data.manifest import MANIFEST_NAME
from t2i.data.shard_writer import ShardWriter

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


def _caption_rows(path: Path, f) -> list[dict]:
    """The rows of an open captions file (JSONL objects, or CSV rows with path,caption columns)."""
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{i}: invalid JSON: {e}") from e
    else:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise SystemExit(f"{path}: CSV needs a header with columns path,caption; got {reader.fieldnames}")
        rows = list(reader)
    return rows


def read_captions(path: Path, folder: Path) -> dict[Path, str]:
    """{resolved image path: caption} from a CSV (path,caption) or a JSONL file."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = _caption_rows(path, f)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not valid UTF-8 ({e}); save the captions file as UTF-8") from None
    captions = {}
    for i, row in enumerate(rows, 1):
        if "path" not in row or "caption" not in row:
            raise SystemExit(f"{path}: row {i} lacks 'path' or 'caption': {row}")
        p = Path(row["path"])
        captions[(p if p.is_absolute() else folder / p).resolve()] = str(row["caption"] or "").strip()
    return captions


def list_files(folder: Path, exclude: list[Path]) -> list[Path]:
    """Candidate image files, recursively, sorted by relative path; skips hidden files, sidecar .txt
    files and anything under / equal to an excluded path (the output folder, the captions file)."""
    excluded = [e.resolve() for e in exclude]
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if not p.is_file() or p.suffix.lower() == ".txt" or any(part.startswith(".") for part in rel.parts):
            continue
        rp = p.resolve()
        if any(rp == e or e in rp.parents for e in excluded):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def probe_image(data: bytes) -> tuple[str, bytes, int, int, str]:
    """(extension, bytes to store, width, height, detected format); raises if PIL cannot decode it."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        fmt, (w, h) = im.format, im.size
        if fmt in KEPT_FORMATS:
            return KEPT_FORMATS[fmt], data, w, h, fmt
        if im.mode not in PNG_MODES:
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "png", buf.getvalue(), w, h, fmt


def folder_to_shards(folder: str | Path, out: str | Path, shard_size: int = 5000,
                     captions: str | Path | None = None, allow_missing_caption: bool = False,
                     overwrite: bool = False) -> dict[str, int]:
    """Write the shards + manifest.json into `out`; returns the counts."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise SystemExit(f"not a folder: {folder}")
    old = sorted(out.glob("shard-*.tar")) + ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else [])
    if old and not overwrite:
        raise SystemExit(f"{out} already holds shards or a manifest; pass --overwrite to replace them")
    table = read_captions(Path(captions), folder) if captions else None
    for p in old:
        p.unlink()
    files = list_files(folder, [out] + ([Path(captions)] if captions else []))
    counts = {"files": len(files), "written": 0, "unreadable": 0, "no_caption": 0, "bad_caption": 0,
              "empty_caption": 0, "converted": 0}
    skipped: list[str] = []
    writer = None
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if table is not None:
            text = table.get(path.resolve())
        else:
            sidecar = path.with_suffix(".txt")
            try:
                text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
            except UnicodeDecodeError:
                counts["bad_caption"] += 1
                skipped.append(f"caption not valid UTF-8: {sidecar.relative_to(folder).as_posix()}")
                continue
        if text is None and not allow_missing_caption:
            counts["no_caption"] += 1
            skipped.append(f"no caption: {rel}")
            continue
        try:
            ext, data, w, h, fmt = probe_image(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - corrupt files make PIL raise many kinds of error
            counts["unreadable"] += 1
            skipped.append(f"unreadable ({type(e).__name__}): {rel}")
            continue
        counts["converted"] += fmt not in KEPT_FORMATS
        counts["empty_caption"] += not text
        key = f"{counts['written']:09d}"
        meta = {"key": key, "caption": text or "", "path": rel, "width": w, "height": h, "format": fmt}
        if writer is None:
            out.mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(out, max_count=shard_size, source_folder=str(folder.resolve()))
        writer.write(key, {ext: data, "txt": text or "", "json": json.dumps(meta, ensure_ascii=False)})
        counts["written"] += 1
    if writer is not None:
        writer.close()
    if table is not None:
        counts["captions_without_image"] = len(set(table) - {p.resolve() for p in files})
    for line in skipped[:20]:
        print(f"  skipped {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more skipped", file=sys.stderr)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    if counts["written"] == 0:
        raise SystemExit(f"no samples written from {folder}")
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="folder of images (walked recursively)")
    ap.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar + manifest.json")
    ap.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    ap.add_argument("--captions", help="CSV (path,caption) or JSONL ({path, caption}) instead of sidecars")
    ap.add_argument("--allow-missing-caption", action="store_true", help="write an empty caption instead")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    a = ap.parse_args(argv)
    folder_to_shards(a.folder, a.out, shard_size=a.shard_size, captions=a.captions,
                     allow_missing_caption=a.allow_missing_caption, overwrite=a.overwrite)


if __name__ == "__main__":
    main()
