"""Bad input: truncated or short shards lose only their own samples, counted (never fatal, never silent);
missing or empty shard lists and a skip rate above the limit stop with an error that names the file. Each kind
of bad sample (corrupt image, bad caption, wrong derived key...): tests/test_bad_input_matrix.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from t2i_testing import png_bytes, write_tar

from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import DataError, ShardInfo, write_manifest


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def good(i):
    return (f"k{i:04d}", {"png": png_bytes(i), "txt": f"caption {i}".encode(), "latent.npy": npy(np.zeros((2, 2)))})


def run_epoch(manifest, **kw):
    dm = ShardDataModule(str(manifest), batch_size=4, num_workers=0, resolution=8, array_fields=("latent.npy",),
                         array_shapes=((2, 2),), max_skip_fraction=1.0, **kw)
    loader = dm.train_dataloader(0, 1)
    keys = [k for b in loader for k in b["key"]]
    return keys, loader.stats


def test_truncated_tar_counts_every_lost_sample(tmp_path):
    samples = [good(i) for i in range(40)]
    write_tar(tmp_path / "a.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    write_tar(tmp_path / "b.tar", [good(i) for i in range(100, 120)])
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / "a.tar"), 40), ShardInfo(str(tmp_path / "b.tar"), 20)])
    keys, stats = run_epoch(manifest)
    assert stats.planned == 60 and len(keys) + stats.skipped == 60
    assert 10 <= stats.skipped <= 30
    assert set(stats.by_shard) == {str(tmp_path / "a.tar")}
    assert all(k.startswith("k01") or int(k[1:]) < 40 for k in keys)


def test_shard_shorter_than_manifest_is_counted(tmp_path):
    write_tar(tmp_path / "a.tar", [good(i) for i in range(12)])
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / "a.tar"), 16)])
    keys, stats = run_epoch(manifest)
    assert len(keys) == 12 and stats.skipped == 4
    assert "fewer samples than its manifest" in stats.examples[0][2]


def test_skip_rate_above_limit_stops_naming_the_shard(tmp_path):
    samples = [good(i) for i in range(8)] + [(f"z{i}", {"png": b"junk", "txt": b"x"}) for i in range(8)]
    write_tar(tmp_path / "bad.tar", samples)
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / "bad.tar"), 16)])
    dm = ShardDataModule(str(manifest), batch_size=4, num_workers=0, resolution=8, max_skip_fraction=0.2,
                         min_samples_for_check=8)
    with pytest.raises(DataError, match="bad.tar"):
        list(dm.train_dataloader(0, 1))


def test_missing_shard_is_an_error_before_training(tmp_path):
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / "gone-000001.tar"), 10)])
    dm = ShardDataModule(str(manifest), batch_size=2, num_workers=0)
    with pytest.raises(DataError, match="gone-000001.tar"):
        dm.setup("fit")


def test_empty_shard_list_and_missing_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "t2i-shards/1", "shards": []}))
    with pytest.raises(DataError, match="lists no shards"):
        ShardDataModule(str(tmp_path), batch_size=2).setup("fit")
    with pytest.raises(DataError, match="nowhere"):
        ShardDataModule(str(tmp_path / "nowhere"), batch_size=2).setup("fit")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        ShardDataModule(str(tmp_path), batch_size=2).setup("fit")


def test_too_few_samples_for_one_global_batch(tmp_path, shard_set):
    manifest = shard_set([3])
    with pytest.raises(ValueError, match="no full global batch"):
        ShardDataModule(str(manifest), batch_size=4, num_workers=0, resolution=8).train_dataloader(0, 1)


def on_white(color, alpha):
    """A colour with straight alpha (0-255) composited on white, per channel, as uint8."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return np.rint(a * np.asarray(color, dtype=np.float64) + (1.0 - a) * 255.0).astype(np.uint8)


def image_in_mode(mode):
    """(8x8 PIL image in `mode`, the RGB pixels it must decode to, tolerance), expected values worked out
    here from the pixel data rather than by PIL's own conversion."""
    from PIL import Image
    rows = np.arange(8, dtype=np.uint8)[:, None].repeat(8, 1)  # the pixel's row, 0..7
    if mode == "L":
        gray = (rows * 31 + np.arange(8, dtype=np.uint8)[None, :] * 3).astype(np.uint8)
        return Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, axis=2), 0
    if mode == "RGBA":
        color = np.zeros((8, 8, 3), np.uint8) + np.array([200, 40, 100], np.uint8)
        alpha = np.choose(rows % 4, [255, 128, 64, 0]).astype(np.uint8)  # opaque, half, quarter, transparent
        img = Image.fromarray(np.dstack([color, alpha]), "RGBA")
        return img, on_white(color, alpha), 1
    palette = [(10, 200, 30), (250, 0, 7), (1, 2, 3), (90, 90, 255)]
    index = (rows % 4).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette([c for rgb in palette for c in rgb])
    expected = np.asarray(palette, np.uint8)[index]
    if mode == "P+transparency":
        img.info["transparency"] = 2  # index 2 (1, 2, 3) fully transparent: white
        expected[index == 2] = 255
    return img, expected, 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "P+transparency", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    """Each PNG mode decodes to the right RGB pixels: gray replicated, alpha and transparent palette
    entries composited on white, palette colours exact, 16-bit scaled to 8."""
    from PIL import Image
    if mode == "I;16":
        values = np.array([0, 1000, 40000, 65535], np.uint16)[np.arange(8) % 4][:, None].repeat(8, 1)
        img = Image.fromarray(values)
        expected = np.rint(values / 65535 * 255).astype(np.uint8)[..., None].repeat(3, 2)
        tolerance = 0
    else:
        img, expected, tolerance = image_in_mode(mode)
    buf = io.BytesIO()
    extra = {"transparency": img.info["transparency"]} if "transparency" in img.info else {}
    img.save(buf, format="PNG", **extra)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode.split("+")[0]
    write_tar(tmp_path / "a.tar", [("k1", {"png": buf.getvalue(), "txt": b"x"})])
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / "a.tar"), 1)])
    dm = ShardDataModule(str(manifest), batch_size=1, num_workers=0, resolution=8)
    batch = next(iter(dm.train_dataloader(0, 1)))
    assert batch["image"].shape == (1, 3, 8, 8) and batch["image"].dtype == torch.uint8
    got = batch["image"][0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - expected.astype(int)).max() <= tolerance, (got[:, 0], expected[:, 0])
