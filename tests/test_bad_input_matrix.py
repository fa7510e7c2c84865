"""The bad-input matrix: each bad input gives a clear error (asserted on its message) or a skip that is
counted with its reason, and nothing is lost: the user's shards, checkpoints and exports are unchanged.

| case                                                  | where it is tested                                        |
|-------------------------------------------------------|-----------------------------------------------------------|
| truncated tar: cut mid-archive, two shards            | data/test_bad_samples.py::test_truncated_tar_counts_every_lost_sample |
| truncated tar: empty file, cut in the first header,   | test_unreadable_shard_counts_every_sample (here)          |
|   not a tar at all                                    |                                                           |
| make_manifest on a shard cut mid-member or inside a   | data/test_data_prep.py::                                  |
|   header (reported, readable part listed; --strict    |   test_make_manifest_keeps_the_readable_part_of_a_damaged_shard[...], |
|   fails), or with no readable sample (left out)       |   ::test_make_manifest_leaves_out_a_shard_with_no_readable_sample |
| shard shorter than its manifest                       | data/test_bad_samples.py::test_shard_shorter_than_manifest_is_counted |
| missing shard, empty / missing / invalid manifest     | data/test_bad_samples.py::test_missing_shard_is_an_error_before_training, ::test_empty_shard_list_and_missing_manifest |
| mostly-bad data (skip rate above max_skip_fraction)   | data/test_bad_samples.py::test_skip_rate_above_limit_stops_naming_the_shard |
| corrupt / truncated / zero-byte image, no image,      | test_bad_sample_is_skipped_and_counted[...] and           |
|   missing / empty / blank / non-UTF-8 caption,        |   test_every_bad_kind_in_one_shard (here)                 |
|   caption of only NUL / control characters,           |                                                           |
|   image above max_pixels, decompression bomb,         |                                                           |
|   latent.npy / clip_txt.npy of another shape,         |                                                           |
|   pickled .npy, missing derived key                   |                                                           |
| caption from json: non-UTF-8, not a string, missing,  | test_caption_variants (here)                              |
|   only control characters; control characters inside |                                                           |
|   a caption removed; caption_required=false keeps     |                                                           |
|   empty (and control-only, as "") captions only       |                                                           |
| non-UTF-8 caption when converting a folder            | test_folder_to_shards_non_utf8_captions (here)            |
| latent.npy of another VAE without data.array_shapes   | test_latents_of_another_vae_are_refused (here)            |
| precomputed text states of another width              | stages/test_imagen_stages.py::test_precomputed_text_equals_the_frozen_encoder ("another text encoder") |
| clip_img.npy of another width (decoder)               | stages/test_unclip_stages.py::test_decoder_refuses_embeddings_of_another_width |
| LDM trained on a VAE of another latent channel count  | stages/test_diffusion_stage.py::test_incompatible_first_stage_is_refused |
| LDM pipeline pointed at a VAE of another channel count| test_export_mismatches (here)                             |
| UNet context width / cond_dropout null width != text  | test_out_of_range_or_mismatched_values[...] (here)        |
|   encoder width (training)                            |                                                           |
| frozen text encoder of another width (pipeline)       | test_export_mismatches (here)                             |
| export config.yaml not matching its weights           | test_export_mismatches (here)                             |
| unCLIP / cascade stages of other resolutions          | stages/test_unclip_stages.py::test_chain_refuses_a_mismatched_upsampler, stages/test_imagen_stages.py::test_cascade_refuses_mismatched_resolutions |
| export of the wrong stage type                        | test_missing_or_wrong_parent_export (here); stages/test_imagen_stages.py, stages/test_noisy_classifier.py |
| missing parent export (training)                      | stages/test_diffusion_stage.py::test_missing_first_stage_export_is_a_clear_error |
| missing parent export (pipelines), incomplete export  | test_missing_or_wrong_parent_export (here)                |
| malicious export config (_target_ outside t2i/torch)  | pipelines/test_export_security.py                         |
| pickled weights file                                  | conditioning/test_conditioning_text.py::test_pickled_objects_are_refused, losses/test_lpips.py::test_pickled_object_refused |
| unknown config key (misspelled override / yaml key)   | cli/test_config.py::test_misspelled_override_fails, ::test_misspelled_key_in_a_config_fails_at_instantiation |
| out-of-range values: ema_decay 1.5 / -0.5, cond       | test_out_of_range_or_mismatched_values[...] (here);       |
|   dropout p 1.5 / -0.1, batch_size 0,                 |   CondDropout unit checks in                              |
|   max_skip_fraction 2, negative learning rate         |   conditioning/test_conditioning_dropout.py::test_bad_configs |
| checkpoint of another stage type                      | not here: the training CLI's stage-tag check and its tests |
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from PIL import Image
from t2i_testing import load_data_prep, png_bytes, tiny_ldm_overrides, write_tar

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.data.datamodule import ShardDataModule
from t2i.data.manifest import ShardInfo, write_manifest
from t2i.exports import CONFIG, WEIGHTS, ExportError, read_export, write_export
from t2i.pipelines.text_to_image import TextToImagePipeline


def digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (what a decompression bomb looks like before decoding)."""
    data = bytearray(png_bytes(0, 1))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ------------------------------------------------------------------------------------ bad samples

SHAPES = {"latent.npy": (2, 2), "clip_txt.npy": (4,)}


def sample(key: str, **changes) -> tuple[str, dict[str, bytes]]:
    """A good sample, with fields replaced by `changes` (None removes the field)."""
    fields = {"png": png_bytes(len(key)), "txt": f"caption of {key}".encode(),
              **{name: npy(np.zeros(shape, np.float32)) for name, shape in SHAPES.items()}}
    for name, value in changes.items():
        name = name.replace("_npy", ".npy")
        if value is None:
            fields.pop(name)
        else:
            fields[name] = value
    return key, fields


BAD_SAMPLES = {  # case -> (fields changed in a good sample, the reason it is counted under)
    "corrupt image bytes": ({"png": b"\x89PNG\r\n\x1a\nnot really a png"}, "undecodable image"),
    "truncated image": ({"png": png_bytes(7, 32)[:60]}, "undecodable image"),
    "zero-byte image": ({"png": b""}, "empty image file"),
    "no image": ({"png": None}, "no image field"),
    "missing caption": ({"txt": None}, "missing or empty caption"),
    "empty caption": ({"txt": b""}, "missing or empty caption"),
    "blank caption": ({"txt": b" \n\t "}, "missing or empty caption"),
    "non-UTF-8 caption": ({"txt": b"\xff\xfe caption \xfa"}, "caption is not valid UTF-8"),
    "NUL-only caption": ({"txt": b"\x00\x00\x00"}, "caption holds only control characters"),
    "control-character caption": ({"txt": b" \x00\x1b\x7f\n\x07\xc2\x85\xc2\x9f"},
                                  "caption holds only control characters"),
    "image above max_pixels": ({"png": header_only_png(5000, 5000)}, "image exceeds max_pixels"),
    "decompression bomb": ({"png": header_only_png(100_000, 100_000)}, "image exceeds PIL's decompression-bomb limit"),
    "latent.npy of another shape": ({"latent_npy": npy(np.zeros((3, 2), np.float32))},
                                    "array latent.npy has shape"),
    "clip_txt.npy of another width": ({"clip_txt_npy": npy(np.zeros(5, np.float32))},
                                      "array clip_txt.npy has shape"),
    "pickled .npy": ({"latent_npy": npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)},
                     "unreadable array latent.npy"),
    "missing derived key": ({"clip_txt_npy": None}, "missing derived key clip_txt.npy"),
}


def shard_of(tmp_path: Path, samples: list) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_tar(tmp_path / "a.tar", samples)
    return write_manifest(tmp_path, [ShardInfo(str(tmp_path / "a.tar"), len(samples))])


def one_epoch(manifest: Path, batch_size: int, **kw):
    kw = {"array_fields": tuple(SHAPES), "array_shapes": tuple(SHAPES.values()), **kw}
    dm = ShardDataModule(str(manifest), batch_size=batch_size, num_workers=0, resolution=8, max_skip_fraction=1.0,
                         max_pixels=4_000_000, shuffle_window=1, **kw)
    loader = dm.train_dataloader(0, 1)
    return list(loader), loader.stats


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_is_skipped_and_counted(tmp_path, case):
    changes, reason = BAD_SAMPLES[case]
    samples = [sample(f"good{i}") for i in range(3)] + [sample("bad", **changes)] + [sample("good3"), sample("good4")]
    manifest = shard_of(tmp_path, samples)
    before = digest(tmp_path / "a.tar")
    batches, stats = one_epoch(manifest, batch_size=2)
    assert len(batches) == 3, "a bad sample leaves a smaller batch, never fewer batches"
    assert sorted(k for b in batches for k in b["key"]) == [f"good{i}" for i in range(5)]
    assert (stats.planned, stats.skipped) == (6, 1)
    assert stats.examples == [(str(tmp_path / "a.tar"), "bad", stats.examples[0][2])]
    assert reason in stats.examples[0][2], stats.examples
    assert sum(stats.by_reason.values()) == 1 and reason.startswith(next(iter(stats.by_reason))), stats.by_reason
    assert all(b["latent"].shape[1:] == SHAPES["latent.npy"] for b in batches)
    assert digest(tmp_path / "a.tar") == before


def test_every_bad_kind_in_one_shard(tmp_path):
    """All kinds mixed with good samples, one sample per batch: every bad one leaves an empty batch (of the
    right shape), and each is counted under its own reason."""
    bad = [sample(f"bad{i:02d}", **changes) for i, (changes, _) in enumerate(BAD_SAMPLES.values())]
    samples = [sample(f"good{i:02d}") for i in range(10)] + bad + [sample(f"good{i:02d}") for i in range(10, 13)]
    batches, stats = one_epoch(shard_of(tmp_path, samples), batch_size=1)
    assert len(batches) == len(samples)
    assert sorted(k for b in batches for k in b["key"]) == [f"good{i:02d}" for i in range(13)]
    assert stats.skipped == len(BAD_SAMPLES) and stats.planned == len(samples)
    reasons = [r for _, _, r in stats.examples]
    for _, reason in BAD_SAMPLES.values():
        assert any(reason in r for r in reasons), (reason, reasons)
    assert all(b["image"].shape == (0, 3, 8, 8) for b in batches if not b["key"])


def test_caption_variants(tmp_path):
    """Captions from a json field are checked the same way; control characters inside a caption are removed;
    with caption_required=false an empty (or control-only) caption is kept as "" (unconditional training) but
    a non-UTF-8 one is still skipped."""
    def js(value) -> bytes:
        return json.dumps({"caption": value}).encode() if not isinstance(value, bytes) else value

    samples = [sample("ok", json=js("a caption")), sample("latin1", json=b'{"caption": "caf\xe9"}'),
               sample("number", json=js(3)), sample("nojson"), sample("nokey", json=b"{}"),
               sample("empty", json=js("")), sample("nul", json=js("\x00")),
               sample("inner", json=js("a\x00 red\tcat\x1b"))]
    batches, stats = one_epoch(shard_of(tmp_path / "j", samples), batch_size=1, caption_field="json:caption")
    assert {k: c for b in batches for k, c in zip(b["key"], b["caption"])} == {
        "ok": "a caption", "inner": "a red\tcat"}
    assert stats.by_reason == {"unreadable json": 1, "json field 'caption' is not a string": 1,
                               "missing or empty caption": 3, "caption holds only control characters": 1}

    samples = [sample("ok"), sample("empty", txt=b""), sample("missing", txt=None), sample("bad", txt=b"\xff"),
               sample("nul", txt=b"\x00\x00"), sample("inner", txt=b"\x00a\x07 cat\x00")]
    batches, stats = one_epoch(shard_of(tmp_path / "t", samples), batch_size=1, caption_required=False)
    assert {k: c for b in batches for k, c in zip(b["key"], b["caption"])} == {
        "ok": "caption of ok", "empty": "", "missing": "", "nul": "", "inner": "a cat"}
    assert stats.by_reason == {"caption is not valid UTF-8": 1}


@pytest.mark.parametrize("damage", ["empty file", "cut in the first header", "not a tar"])
def test_unreadable_shard_counts_every_sample(tmp_path, damage):
    """A shard that cannot be opened at all: every sample it should hold is counted as skipped, the other
    shards are read in full. (A tar cut in the middle: data/test_bad_samples.py.)"""
    write_tar(tmp_path / "a.tar", [sample(f"a{i}") for i in range(6)])
    write_tar(tmp_path / "b.tar", [sample(f"b{i}") for i in range(6)])
    data = (tmp_path / "a.tar").read_bytes()
    damaged = {"empty file": b"", "cut in the first header": data[:100],
               "not a tar": np.random.default_rng(0).bytes(4096)}[damage]
    (tmp_path / "a.tar").write_bytes(damaged)
    manifest = write_manifest(tmp_path, [ShardInfo(str(tmp_path / n), 6) for n in ("a.tar", "b.tar")])
    before = digest(tmp_path)
    batches, stats = one_epoch(manifest, batch_size=3)
    assert len(batches) == 4
    assert sorted(k for b in batches for k in b["key"]) == [f"b{i}" for i in range(6)]
    assert stats.skipped == 6 and set(stats.by_shard) == {str(tmp_path / "a.tar")}
    assert all(r.startswith(("cannot open shard", "unreadable tar data")) for r in stats.by_reason), stats.by_reason
    assert digest(tmp_path) == before


def test_folder_to_shards_non_utf8_captions(tmp_path):
    """Converting a folder: a non-UTF-8 sidecar caption skips (and counts) that image; a non-UTF-8 captions
    file is a clear error before anything is written or replaced."""
    folder_to_shards = load_data_prep("folder_to_shards")
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / f"{name}.png")
    (root / "a.txt").write_text("a caption", encoding="utf-8")
    (root / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (root / "c.txt").write_text("another caption", encoding="utf-8")
    counts = folder_to_shards.folder_to_shards(root, tmp_path / "out", shard_size=10)
    assert counts["written"] == 2 and counts["bad_caption"] == 1
    shards = digest(tmp_path / "out")

    csv_file = tmp_path / "captions.csv"
    csv_file.write_bytes(b"path,caption\na.png,caf\xe9\n")
    with pytest.raises(SystemExit, match=r"captions\.csv: not valid UTF-8"):
        folder_to_shards.folder_to_shards(root, tmp_path / "out", captions=csv_file, overwrite=True)
    assert digest(tmp_path / "out") == shards, "the existing shards were replaced before the error"


# -------------------------------------------------------------------------- configs and values

@pytest.fixture
def ldm_run(tiny_ldm_export, tmp_path) -> Path:
    """A copy of a finished tiny LDM run (checkpoints/last.ckpt and export/), to resume with bad values."""
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_ldm_export).parent, run)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "export" / WEIGHTS).is_file()
    return run


BAD_VALUES = {  # override -> what the error says
    "model.ema_decay=1.5": r"model\.ema_decay must be in \[0, 1\) \(0 turns EMA off\), got 1\.5",
    "model.ema_decay=-0.5": r"model\.ema_decay must be in \[0, 1\) \(0 turns EMA off\), got -0\.5",
    "model.cond_dropout.p.context=1.5": r"drop probability of 'context' must be in \[0, 1\], got 1\.5",
    "model.cond_dropout.p.context=-0.1": r"drop probability of 'context' must be in \[0, 1\], got -0\.1",
    "data.batch_size=0": r"data\.batch_size must be >= 1, got 0",
    "data.max_skip_fraction=2": r"max_skip_fraction must be in \[0, 1\], got 2",
    "model.optimizer.lr=-0.001": r"Invalid learning rate: -0\.001",
    "model.denoiser.context_dim=16": r"text encoder gives 32-wide tokens, the UNet expects context_dim=16",
    "model.cond_dropout.context_dim=16": r"context null is 16 wide; set model\.cond_dropout\.context_dim=32",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_out_of_range_or_mismatched_values(small_shapes, tiny_vae_export, ldm_run, override):
    """Resuming a run with a bad value stops with a message naming it, before the run's checkpoint, its
    export or its parent export change."""
    kept = {**digest(ldm_run / "checkpoints"), **digest(ldm_run / "export"), **digest(Path(tiny_vae_export))}
    cfg = compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, ldm_run, "ckpt_path=last",
                                            "trainer.max_steps=4", override))
    with pytest.raises(Exception, match=BAD_VALUES[override]):
        train(cfg)
    assert {**digest(ldm_run / "checkpoints"), **digest(ldm_run / "export"),
            **digest(Path(tiny_vae_export))} == kept


def test_latents_of_another_vae_are_refused(small_shapes, tiny_vae_export, tmp_path):
    """Precomputed latents are checked against the VAE export even without data.array_shapes."""
    cfg = compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path, "model.target.precomputed=true"))
    stage = instantiate(cfg.model)
    assert stage.target.x0({"latent": torch.zeros(2, 4, 8, 8)}, stage.net).shape == (2, 4, 8, 8)
    for shape in [(2, 8, 8, 8), (2, 4, 16, 16), (2, 4, 64)]:
        with pytest.raises(ValueError, match=r"latent\.npy of shape .* but the VAE export .* makes \(4, 8, 8\) "
                                             r"latents at image_size=32.*encode_latents\.py"):
            stage.target.x0({"latent": torch.zeros(shape)}, stage.net)


# --------------------------------------------------------------------------------------- exports

def copy_export(export: Path, folder: Path, edit=None) -> Path:
    shutil.copytree(export, folder)
    if edit is not None:
        config = yaml.safe_load((folder / CONFIG).read_text())
        edit(config)
        (folder / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def build_export(folder: Path, stage: str, config: dict, parts: tuple[str, ...], metrics=None) -> Path:
    """An export of freshly built `parts` of ``config["model"]`` (weights that match the config)."""
    state = {}
    for part in parts:
        state.update({f"{part}.{k}": v for k, v in instantiate(config["model"][part]).state_dict().items()})
    return write_export(folder, stage, state, config, metrics=metrics)


def vae_with_other_channels(tiny_vae_export: Path, folder: Path) -> Path:
    config = copy.deepcopy(read_export(tiny_vae_export).config)
    config["model"]["autoencoder"]["latent_channels"] = 8
    return build_export(folder, "autoencoder", config, ("autoencoder",), metrics={"latent_scale": 1.0})


def base_with_frozen_text_encoder(tiny_ldm_export: Path, tiny_clip_export: Path, folder: Path) -> Path:
    """A pixel-space text-to-image export whose UNet takes 16-wide tokens while its config names a CLIP export
    whose text tower gives 32-wide ones (as if that CLIP export had been replaced after training)."""
    config = copy.deepcopy(read_export(tiny_ldm_export).config)
    model = config["model"]
    model["denoiser"].update(in_channels=3, out_channels=3, context_dim=16)
    model["cond_dropout"]["context_dim"] = 16
    model["text_encoder"] = {"_target_": "t2i.conditioning.text.OpenClipTextEncoder.from_clip_export",
                             "export_dir": str(tiny_clip_export)}
    model["target"] = {"_target_": "t2i.stages.targets.Pixels"}
    return build_export(folder, "base", config, ("denoiser", "cond_dropout"))


def test_export_mismatches(tiny_vae_export, tiny_ldm_export, tiny_clip_export, tmp_path):
    kept = {**digest(Path(tiny_vae_export)), **digest(Path(tiny_ldm_export)), **digest(Path(tiny_clip_export))}
    # vae with other latent channels
    vae8 = vae_with_other_channels(tiny_vae_export, tmp_path / "vae8")
    with pytest.raises(ExportError, match=r"denoises 4-channel latents, but the VAE export .*vae8 makes 8-channel "
                                          r"ones: pass the VAE export this stage was trained with"):
        TextToImagePipeline.from_export(tiny_ldm_export, vae_export=vae8)
    # config edited after export
    edited = copy_export(tiny_ldm_export, tmp_path / "edited",
                         lambda c: c["model"]["denoiser"].update(context_dim=16))
    with pytest.raises(ExportError, match=r"the weights for 'denoiser' do not match its config\.yaml \(model\.denoiser"
                                          r"\): missing \[\], unexpected \[\], shape mismatches \[.*attn2\.to_k\.weight: "
                                          r"weights \(16, 32\) vs config \(16, 16\)"):
        TextToImagePipeline.from_export(edited)
    # frozen text encoder of another width
    base = base_with_frozen_text_encoder(tiny_ldm_export, tiny_clip_export, tmp_path / "base")
    with pytest.raises(ExportError, match=r"its denoiser was trained on 16-wide text token states, but the text "
                                          r"encoder its config names gives 32-wide ones"):
        TextToImagePipeline.from_export(base, stage="base")
    assert {**digest(Path(tiny_vae_export)), **digest(Path(tiny_ldm_export)),
            **digest(Path(tiny_clip_export))} == kept


def test_missing_or_wrong_parent_export(tiny_vae_export, tiny_ldm_export, tiny_clip_export, tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(ExportError, match=r"stage export not found: .*gone \(train that stage first\)"):
        TextToImagePipeline.from_export(gone)
    with pytest.raises(ExportError, match=r"needs its VAE export .*gone, which is missing \(pass vae_export=\)"):
        TextToImagePipeline.from_export(tiny_ldm_export, vae_export=gone)
    moved = copy_export(tiny_ldm_export, tmp_path / "moved", lambda c: c["model"]["target"].update(export=str(gone)))
    with pytest.raises(ExportError, match=r"needs its VAE export .*gone, which is missing"):
        TextToImagePipeline.from_export(moved)
    with pytest.raises(ExportError, match=r"is a 'ldm' export, expected a 'autoencoder' export"):
        TextToImagePipeline.from_export(tiny_ldm_export, vae_export=tiny_ldm_export)
    incomplete = copy_export(tiny_vae_export, tmp_path / "incomplete")
    (incomplete / WEIGHTS).unlink()
    with pytest.raises(ExportError, match=r"incomplete\D*incomplete: missing model\.safetensors"):
        TextToImagePipeline.from_export(tiny_ldm_export, vae_export=incomplete)
    base = base_with_frozen_text_encoder(tiny_ldm_export, tiny_clip_export, tmp_path / "base")
    config = yaml.safe_load((base / CONFIG).read_text())
    config["model"]["text_encoder"]["export_dir"] = str(gone)
    (base / CONFIG).write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match=r"stage export not found: .*gone \(train that stage first\)"):
        TextToImagePipeline.from_export(base, stage="base")
