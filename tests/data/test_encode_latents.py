"""data_prep/encode_latents.py: precomputed latents equal the ones the LDM stage computes on the fly,
every sample is kept, and a rerun skips finished shards."""

from __future__ import annotations

import torch
from t2i_testing import load_data_prep

from t2i.data.datamodule import ShardDataModule
from t2i.pipelines.autoencoder import load_autoencoder


def test_latents_match_on_the_fly_encoding(small_shapes, tiny_vae_export, tmp_path, capsys):
    encode = load_data_prep("encode_latents")
    out = tmp_path / "latents"
    encode.main(["--vae", str(tiny_vae_export), "--shards", str(small_shapes / "val"), "--out", str(out),
                 "--resolution", "32", "--batch", "50"])
    dm = ShardDataModule(str(out), batch_size=16, num_workers=0, resolution=32, array_fields=("latent.npy",),
                         shuffle_window=1)
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader(0, 1) or dm.train_dataloader(0, 1))), 0) \
        if dm.val_data else dm.on_after_batch_transfer(next(iter(dm.train_dataloader(0, 1))), 0)
    vae = load_autoencoder(tiny_vae_export)
    torch.testing.assert_close(batch["latent"], vae.encode(batch["image"]), atol=1e-5, rtol=1e-4)
    assert dm.train_data.total == 128
    encode.main(["--vae", str(tiny_vae_export), "--shards", str(small_shapes / "val"), "--out", str(out),
                 "--resolution", "32"])
    assert "done earlier" in capsys.readouterr().out


def test_bucketed_latents_follow_each_bucket_and_train_a_tiny_ldm(tiny_vae_export, tmp_path):
    """--bucket-area: each sample's latent has its bucket's shape and equals the on-the-fly encoding of the
    stream's centre crop; original_size/crop_top_left match the image path's; a tiny LDM trains on them with the
    same buckets, and another bucket set is refused."""
    import numpy as np
    import pytest
    from t2i_testing import tiny_ldm_overrides
    from test_bucket_stream import sized_shards

    from t2i.cli.config import compose_config
    from t2i.cli.train import train
    from t2i.data.manifest import DataError, load_manifest

    src = sized_shards(tmp_path / "src", [23, 17])
    out = tmp_path / "latents"
    load_data_prep("encode_latents").main(["--vae", str(tiny_vae_export), "--shards", str(src), "--out", str(out),
                                           "--resolution", "32", "--batch", "4", "--bucket-area", "1024",
                                           "--bucket-multiple", "16"])
    manifest = load_manifest(out)
    assert sorted(manifest.buckets) == [(16, 64), (32, 32), (64, 16)] and manifest.total == 40
    assert [s.sizes for s in manifest.shards] == [s.sizes for s in load_manifest(src).shards]
    buckets = [list(b) for b in manifest.buckets]
    arrays = ("latent.npy", "original_size.npy", "crop_top_left.npy")
    images = ShardDataModule(str(out), str(out), batch_size=5, num_workers=0, resolution=32, buckets=buckets)
    latents = ShardDataModule(str(out), str(out), batch_size=5, num_workers=0, resolution=0, buckets=buckets,
                              array_fields=arrays)
    vae, shapes = load_autoencoder(tiny_vae_export), set()
    for a, b in zip(images.val_dataloader(0, 1), latents.val_dataloader(0, 1), strict=True):
        assert a["key"] == b["key"]
        a = images.on_after_batch_transfer(a, 0)
        torch.testing.assert_close(b["latent"], vae.encode(a["image"]), atol=1e-5, rtol=1e-4)
        assert torch.equal(a["original_size"], b["original_size"]) and torch.equal(a["crop_top_left"],
                                                                                   b["crop_top_left"])
        shapes.add(tuple(b["latent"].shape[-2:]))
    f = vae.downsample_factor
    assert shapes == {(h // f, w // f) for h, w in manifest.buckets}
    with pytest.raises(DataError, match="computed per aspect-ratio bucket"):
        ShardDataModule(str(out), batch_size=5, num_workers=0, resolution=0, array_fields=arrays,
                        buckets=[[32, 32]]).train_dataloader(0, 1)
    cfg = compose_config(tiny_ldm_overrides(out, tiny_vae_export, tmp_path / "run", "trainer.max_steps=2",
                                            "final_validation=false", "data.buckets={area: 1024, multiple: 16}",
                                            "data.resolution=0", "model.target.precomputed=true",
                                            "data.array_fields=[latent.npy,original_size.npy,crop_top_left.npy]",
                                            "model.conditioner.size_embedding=8", "model.denoiser.vector_dim=48",
                                            "export=false"))
    cfg.data.train_manifest = cfg.data.val_manifest = str(out)
    result = train(cfg)
    assert np.isfinite(result.metrics["train/loss"])
