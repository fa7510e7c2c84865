"""The bucketed data stream: batches of one aspect-ratio bucket each, the same bucket on every rank at every step,
no sample twice, exact mid-epoch resume, every skipped sample counted, and a tiny LDM that trains on it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_testing import tiny_ldm_overrides

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.data.buckets import bucket_sizes
from t2i.data.decode import DecodeConfig
from t2i.data.manifest import DataError, ShardInfo, load_manifest, write_manifest
from t2i.data.plan import Layout
from t2i.data.stream import ShardStream

SHAPES = [(20, 80), (80, 20), (40, 40), (30, 50), (50, 30), (36, 44)]  # (height, width): wide, tall, near square
BUCKETS = bucket_sizes(32 * 32, multiple=16)  # 16x64, 32x32, 64x16


def image_bytes(value: int, h: int, w: int) -> bytes:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1] = value % 256, value // 256  # the sample's global index, in every pixel
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sized_shards(folder: Path, counts: list[int], broken: tuple[int, ...] = (), sizes: bool = True) -> Path:
    """Shards of images of the `SHAPES` in turn (caption = key); sample g's image encodes g; `broken` samples
    hold undecodable bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    infos, g = [], 0
    for s, n in enumerate(counts):
        path, shard_sizes = folder / f"{s:05d}.tar", []
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                h, w = SHAPES[g % len(SHAPES)]
                data = b"\x89PNG broken" if g in broken else image_bytes(g, h, w)
                for ext, payload in (("png", data), ("txt", f"k{g:05d}".encode())):
                    info = tarfile.TarInfo(f"k{g:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                shard_sizes.append((0, 0) if g in broken else (h, w))
                g += 1
        infos.append(ShardInfo(str(path), n, tuple(shard_sizes) if sizes else None))
    write_manifest(folder, infos)
    return folder


def stream(folder: Path, rank: int = 0, world: int = 1, batch: int = 4, train: bool = True) -> ShardStream:
    layout = Layout(world, rank, 1, batch, drop_last=train, shuffle=train, shuffle_window=16, seed=5)
    decode = DecodeConfig(resolution=32, crop="random" if train else "center")
    return ShardStream(load_manifest(folder), layout, decode, BUCKETS)


def test_batches_hold_one_bucket_and_ranks_step_together(tmp_path):
    folder = sized_shards(tmp_path / "d", [37, 41, 22])
    ranks = [list(stream(folder, r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(stream(folder, 0, 2)) > 0
    keys = []
    for a, b in zip(*ranks):
        assert a["image"].shape == b["image"].shape and tuple(a["image"].shape[-2:]) in BUCKETS
        for batch in (a, b):
            assert batch["image"].shape[0] == len(batch["caption"]) == 4 and not batch["skipped"]
            index = batch["image"][:, 0, 0, 0].long() + 256 * batch["image"][:, 1, 0, 0].long()
            assert [f"k{int(g):05d}" for g in index] == batch["caption"]  # pixels and captions of one sample
            assert [list(SHAPES[int(g) % len(SHAPES)]) for g in index] == batch["original_size"].tolist()
            h, w = batch["image"].shape[-2:]
            for (oh, ow), (top, left) in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
                scale = max(h / oh, w / ow)  # the crop lies inside the resized image
                assert 0 <= top <= round(oh * scale) - h and 0 <= left <= round(ow * scale) - w
            keys += batch["caption"]
    assert len(keys) == len(set(keys))  # no sample twice in an epoch


def test_resume_mid_epoch_continues_exactly(tmp_path):
    folder = sized_shards(tmp_path / "d", [30, 30])
    s = stream(folder)
    s.set_position(1, 0)
    whole = list(s)
    s.set_position(1, 3)
    rest = list(s)
    assert len(rest) == len(whole) - 3
    for a, b in zip(whole[3:], rest):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["crop_top_left"], b["crop_top_left"])
    s.set_position(2, 0)
    assert [b["caption"] for b in s] != [b["caption"] for b in whole]  # another epoch, another order


def test_validation_reads_every_sample_once_and_counts_the_unreadable(tmp_path):
    folder = sized_shards(tmp_path / "d", [13, 11], broken=(4, 17))
    batches = [b for r in range(2) for b in stream(folder, r, 2, train=False)]
    captions = [c for b in batches for c in b["caption"]]
    skipped = [key for b in batches for _, key, _ in b["skipped"]]
    assert sorted(captions + skipped) == [f"k{g:05d}" for g in range(24)] and sorted(skipped) == ["k00004", "k00017"]
    assert all(tuple(b["image"].shape[-2:]) in BUCKETS for b in batches)


def test_loader_workers_deliver_the_in_process_order(tmp_path):
    """Two DataLoader workers, each producing every other batch of the rank, give the one-process sequence."""
    from t2i.data.datamodule import ShardDataModule
    folder = sized_shards(tmp_path / "d", [25, 25])
    dm = ShardDataModule(str(folder), batch_size=4, num_workers=2, seed=5, resolution=32, crop="random",
                         buckets=[list(b) for b in BUCKETS])
    dm.setup()
    with_workers = [b["caption"] for b in dm.loader(dm.train_data, train=True, rank=0, world=1)]
    one = ShardDataModule(str(folder), batch_size=4, num_workers=0, seed=5, resolution=32, crop="random",
                          buckets={"area": 1024, "multiple": 16})
    one.setup()
    assert with_workers == [b["caption"] for b in one.loader(one.train_data, train=True, rank=0, world=1)]


def test_buckets_need_sizes_in_the_manifest_and_local_shards(tmp_path):
    folder = sized_shards(tmp_path / "d", [8], sizes=False)
    with pytest.raises(DataError, match=r"needs each sample's image size.*make_manifest.py --sizes"):
        stream(folder)
    piped = sized_shards(tmp_path / "p", [8])
    shard = load_manifest(piped).shards[0]
    write_manifest(piped, [ShardInfo(f"pipe:cat {shard.url}", shard.num_samples, shard.sizes)])
    with pytest.raises(DataError, match=r"pipe: shard\(s\) .* streamed again for every sample"):
        stream(piped)


def test_a_tiny_ldm_trains_on_buckets_with_size_conditioning(tmp_path, tiny_vae_export):
    train_dir, val_dir = sized_shards(tmp_path / "train", [40, 40]), sized_shards(tmp_path / "val", [16])
    cfg = compose_config(tiny_ldm_overrides(train_dir, tiny_vae_export, tmp_path / "run", "trainer.max_steps=2",
                                            "final_validation=false", "data.buckets={area: 1024, multiple: 16}",
                                            "model.conditioner.size_embedding=8", "model.denoiser.vector_dim=48"))
    cfg.data.train_manifest, cfg.data.val_manifest = str(train_dir), str(val_dir)
    result = train(cfg)
    assert result.export_dir is not None and np.isfinite(result.metrics["train/loss"])


def test_a_run_cannot_resume_with_another_bucket_set(tmp_path):
    from t2i.data.datamodule import ShardDataModule
    folder = sized_shards(tmp_path / "d", [25, 25])

    def loader(buckets):
        dm = ShardDataModule(str(folder), batch_size=4, num_workers=0, seed=5, resolution=32, buckets=buckets)
        dm.setup()
        return dm.loader(dm.train_data, train=True, rank=0, world=1)

    state = loader({"area": 1024, "multiple": 16}).state_dict()
    assert state["layout"]["buckets"] == [list(b) for b in BUCKETS]
    with pytest.raises(DataError, match="samples or their order changed"):
        loader([[32, 32]]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\[height, width\] pairs"):
        loader([[32]])


def test_real_data_defaults_to_buckets_of_the_resolution_area(tmp_path):
    """data=webdataset trains on aspect-ratio buckets of about resolution^2 pixels unless data.buckets=null; shards
    whose manifest lacks image sizes are refused with the command that adds them."""
    from hydra.utils import instantiate

    folder = sized_shards(tmp_path / "d", [30])
    cfg = compose_config(["data=webdataset", f"data.train_manifest={folder}", "data.resolution=256",
                          "data.num_workers=0", "data.batch_size=2"])
    dm = instantiate(cfg.data)
    assert dm.buckets == bucket_sizes(256 * 256, multiple=64) and (256, 256) in dm.buckets
    assert len(dm.train_dataloader(0, 1)) > 0
    unsized = sized_shards(tmp_path / "u", [30], sizes=False)
    cfg.data.train_manifest = str(unsized)
    with pytest.raises(DataError, match="make_manifest.py --sizes"):
        instantiate(cfg.data).train_dataloader(0, 1)
    cfg.data.buckets = None
    assert instantiate(cfg.data).buckets is None
