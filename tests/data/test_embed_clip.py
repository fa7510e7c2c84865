"""data_prep/embed_clip.py: new shards keep every field and add L2-normalised CLIP embeddings equal to the
frozen encoders' (the ones later stages load), bad samples are skipped and counted, a rerun skips done
shards."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from t2i_testing import load_data_prep, png_bytes, write_tar

from t2i.conditioning.clip import ClipImageEncoder
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import ShardInfo, load_manifest, write_manifest
from t2i.data.tar_reader import read_samples


def test_embeddings_fields_and_resume(small_shapes, tiny_clip_export, tmp_path, capsys, single_thread):
    embed = load_data_prep("embed_clip")
    out = tmp_path / "clip"
    embed.main(["--clip", str(tiny_clip_export), "--shards", str(small_shapes / "val"), "--out", str(out),
                "--batch", "50"])
    assert "128 samples, 0 skipped" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 128 and manifest["embed_dim"] == 32 and manifest["resolution"] == 32
    assert manifest["fields"] == ["clip_img.npy", "clip_txt.npy"]
    assert manifest["clip_export"] == str(tiny_clip_export.resolve())
    # every original field is kept byte for byte
    src = load_manifest(small_shapes / "val").shards
    dst = load_manifest(out).shards
    assert [s.num_samples for s in src] == [s.num_samples for s in dst]
    for a, b in zip(src, dst, strict=True):
        for raw, new in zip(read_samples(a.url, 0, a.num_samples), read_samples(b.url, 0, b.num_samples), strict=True):
            assert raw.key == new.key and set(new.fields) == set(raw.fields) | {"clip_img.npy", "clip_txt.npy"}
            assert all(new.fields[k] == v for k, v in raw.fields.items())
    # embeddings: (D,) float32, unit norm, equal to the frozen encoders on the decoded images and captions
    dm = ShardDataModule(str(out), batch_size=64, num_workers=0, resolution=32, shuffle_window=1,
                         array_fields=("clip_img.npy", "clip_txt.npy"), array_shapes=((32,), (32,)))
    dm.setup()
    batch = dm.on_after_batch_transfer(next(iter(dm.loader(dm.train_data, train=False, rank=0, world=1))), 0)
    img, txt = batch["clip_img"], batch["clip_txt"]
    assert img.dtype == txt.dtype == torch.float32 and img.shape == txt.shape == (64, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(64))
    image_encoder = ClipImageEncoder.from_clip_export(tiny_clip_export, normalize=True)
    torch.testing.assert_close(img, image_encoder(batch["image"]), atol=1e-5, rtol=1e-5)
    pooled = OpenClipTextEncoder.from_clip_export(tiny_clip_export)(batch["caption"]).pooled
    torch.testing.assert_close(txt, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-5)
    # a rerun skips the finished shard
    embed.main(["--clip", str(tiny_clip_export), "--shards", str(small_shapes / "val"), "--out", str(out)])
    assert "done earlier (128 samples)" in capsys.readouterr().out


def test_bad_samples_are_skipped_and_counted(tiny_clip_export, tmp_path, capsys, single_thread):
    folder = tmp_path / "shards"
    folder.mkdir()
    samples = [("ok0", {"png": png_bytes(10, 16), "txt": b"a red circle"}),
               ("noimage", {"txt": b"a caption without image"}),
               ("badimage", {"png": b"not a png", "txt": b"broken"}),
               ("nocaption", {"png": png_bytes(20, 16)}),
               ("ok1", {"png": png_bytes(30, 16), "txt": b"a blue square"})]
    write_tar(folder / "shard-000000.tar", samples)
    write_manifest(folder, [ShardInfo(str(folder / "shard-000000.tar"), len(samples))])
    out = tmp_path / "out"
    load_data_prep("embed_clip").main(["--clip", str(tiny_clip_export), "--shards", str(folder), "--out", str(out),
                                       "--resolution", "16"])
    assert "2 samples, 3 skipped" in capsys.readouterr().out
    (kept,) = load_manifest(out).shards
    keys = [s.key for s in read_samples(kept.url, 0, kept.num_samples)]
    assert keys == ["ok0", "ok1"]
    arr = np.load(io.BytesIO(next(read_samples(kept.url, 0, 1)).fields["clip_img.npy"]))
    assert arr.shape == (32,) and arr.dtype == np.float32
