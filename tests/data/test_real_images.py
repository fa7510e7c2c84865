"""A real photograph (the one matplotlib ships: nothing is downloaded) in every aspect ratio from 1:10 to 10:1 and
in the modes real datasets hold (RGB and greyscale JPEG, CMYK JPEG, RGBA, palette and 16-bit grey PNG, WebP),
packed with data_prep/folder_to_shards.py, sized with make_manifest.py --sizes and read by the bucketed stream:
nothing is skipped, each image lands in the bucket nearest its aspect ratio, and what arrives is the photograph's
centre crop, whatever the file's mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from t2i_testing import load_data_prep

from t2i.data.buckets import bucket_sizes, cover_and_crop, nearest_bucket
from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import load_manifest

matplotlib = pytest.importorskip("matplotlib")
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
RATIOS = [(10, 1), (4, 1), (2, 1), (4, 3), (1, 1), (3, 4), (1, 2), (1, 4), (1, 10)]  # width : height
MODES = ["rgb.jpg", "grey.jpg", "cmyk.jpg", "rgba.png", "palette.png", "grey16.png", "photo.webp"]
BUCKETS = bucket_sizes(64 * 64, multiple=16)


def _crop(photo: Image.Image, ratio: tuple[int, int]) -> Image.Image:
    """The largest centred crop of `photo` with aspect ratio `ratio` (width : height)."""
    w, h = photo.size
    cw, ch = (w, w * ratio[1] // ratio[0]) if w * ratio[1] <= h * ratio[0] else (h * ratio[0] // ratio[1], h)
    return photo.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _save(img: Image.Image, mode: str, path: Path) -> Image.Image:
    """Write `img` in `mode`; returns the RGB image the file should decode to (up to compression)."""
    if mode == "rgb.jpg":
        img.save(path, quality=95)
    elif mode == "grey.jpg":
        img = img.convert("L").convert("RGB")
        img.convert("L").save(path, quality=95)
    elif mode == "cmyk.jpg":
        img.convert("CMYK").save(path, quality=95)
    elif mode == "rgba.png":
        img.convert("RGBA").save(path)  # opaque: the white background must not show
    elif mode == "palette.png":
        img = img.quantize(256).convert("RGB")
        img.quantize(256).save(path)
    elif mode == "grey16.png":
        grey = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)  # the full 16-bit range
        assert grey.mode == "I;16"
        grey.save(path)
        img = img.convert("L").convert("RGB")
    else:
        img.save(path, quality=95)
    return img


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("real")
    photo = Image.open(PHOTO).convert("RGB")
    expected = {}  # caption -> the RGB image its file holds
    for ratio in RATIOS:
        for mode in MODES:
            path = folder / f"{ratio[0]}x{ratio[1]}_{mode}"
            caption = f"grace hopper {ratio[0]}:{ratio[1]} {mode}"
            expected[caption] = _save(_crop(photo, ratio), mode, path)
            path.with_suffix(".txt").write_text(caption)
    load_data_prep("folder_to_shards").main([str(folder), "--out", str(out), "--shard-size", "20"])
    load_data_prep("make_manifest").main([str(out), "--sizes"])
    return out, expected


def test_every_mode_and_aspect_ratio_arrives_as_its_bucket_crop(real_shards):
    out, expected = real_shards
    manifest = load_manifest(out)
    assert manifest.total == len(RATIOS) * len(MODES)
    dm = ShardDataModule(str(out), str(out), batch_size=4, num_workers=0, resolution=64,
                         buckets=[list(b) for b in BUCKETS])
    loader = dm.val_dataloader(0, 1)
    seen = {}
    for batch in loader:
        for i, caption in enumerate(batch["caption"]):
            seen[caption] = (batch["image"][i], batch["original_size"][i], batch["crop_top_left"][i])
    assert loader.stats.skipped == 0 and len(seen) == manifest.total
    used = set()
    for name, want in expected.items():
        image, original, crop = seen[name]
        bucket = BUCKETS[nearest_bucket(want.height, want.width, BUCKETS)]
        used.add(bucket)
        assert tuple(image.shape) == (3, *bucket), name
        assert tuple(original.tolist()) == (want.height, want.width)
        (rh, rw), (top, left) = cover_and_crop(want.height, want.width, bucket)
        assert tuple(crop.tolist()) == (top, left)
        ref = np.asarray(want.resize((rw, rh), Image.BICUBIC).crop((left, top, left + bucket[1], top + bucket[0])))
        diff = np.abs(image.permute(1, 2, 0).numpy().astype(np.float64) - ref).mean()
        assert diff < 8.0, f"{name}: mean abs difference {diff:.1f} from the photograph's crop"
    assert min(b[1] / b[0] for b in used) <= 0.25 and max(b[1] / b[0] for b in used) >= 4.0, \
        "the 1:10 and 10:1 crops should reach the extreme buckets"
