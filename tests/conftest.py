"""Shared fixtures: small shard sets and shapes datasets, tiny stage exports (tests make their own data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from t2i_testing import (
    load_data_prep,
    make_shard_set,
    tiny_clip_overrides,
    tiny_ldm_overrides,
    tiny_overrides,
)


@pytest.fixture
def shard_set(tmp_path):
    def make(sizes, name="shards", image_size=8):
        return make_shard_set(tmp_path / name, sizes, image_size)
    return make




@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory) -> Path:
    """A small shapes dataset (600 train / 128 val samples) shared by the training tests."""
    out = tmp_path_factory.mktemp("shapes")
    load_data_prep("make_shapes").make_shapes(out, train=600, val=128, seed=0, shard_size=250, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_vae_export(small_shapes, tmp_path_factory) -> Path:
    from t2i.cli.config import compose_config
    from t2i.cli.train import train
    run = tmp_path_factory.mktemp("vae")
    result = train(compose_config(tiny_overrides(small_shapes, run, "trainer.max_steps=2",
                                                 "final_validation=false")))
    return result.export_dir


@pytest.fixture(scope="session")
def tiny_ldm_export(small_shapes, tiny_vae_export, tmp_path_factory) -> Path:
    from t2i.cli.config import compose_config
    from t2i.cli.train import train
    run = tmp_path_factory.mktemp("ldm")
    result = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, run, "trainer.max_steps=2",
                                                     "final_validation=false")))
    return result.export_dir


@pytest.fixture(scope="session")
def tiny_clip_export(small_shapes, tmp_path_factory) -> Path:
    """A CLIP stage export (1-layer, 32-wide, embed_dim 32) trained 2 steps on `small_shapes`."""
    from t2i.cli.config import compose_config
    from t2i.cli.train import train
    run = tmp_path_factory.mktemp("clip")
    result = train(compose_config(tiny_clip_overrides(small_shapes, run, "trainer.max_steps=2",
                                                      "final_validation=false")))
    return result.export_dir


@pytest.fixture
def single_thread():
    """Tests of many tiny tensor ops: one intra-op thread avoids spin-wait stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_shards(small_shapes, tiny_clip_export, tmp_path_factory):
    """The small shapes set with clip_img.npy / clip_txt.npy written by data_prep/embed_clip.py."""
    out = tmp_path_factory.mktemp("clip_shards")
    embed = load_data_prep("embed_clip")
    for split in ("train", "val"):
        embed.main(["--clip", str(tiny_clip_export), "--shards", str(small_shapes / split), "--out",
                    str(out / split), "--batch", "64", "--device", "cpu"])
    return out
