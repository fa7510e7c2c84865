"""Bad input: truncated or short shards lose only their own samples, counted (never fatal, never silent);
missing or empty shard lists and a skip rate above the limit stop with an error that names the file. Each kind
of bad sample (corrupt image, bad caption, wrong derived key...): tests/test_bad_input_matrix.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
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


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    from PIL import Image
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(buf, format="PNG")
    else:
        Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode).save(buf, format="PNG")
    write_tar(tmp_path / "a.tar", [("k1", {"png": buf.getvalue(), "txt": b"x"})] * 1)
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / "a.tar"), 1)])
    dm = ShardDataModule(str(manifest), batch_size=1, num_workers=0, resolution=8)
    batch = next(iter(dm.train_dataloader(0, 1)))
    assert batch["image"].shape == (1, 3, 8, 8) and batch["image"].dtype.is_floating_point is False
    if mode == "I;16":
        assert abs(int(batch["image"][0, 0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
