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
