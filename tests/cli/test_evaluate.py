"""`python -m t2i.cli.evaluate` over folders of PNGs (prompts in their metadata) and shard sets, and the
`SampleMetrics` callback during the tiny LDM's validation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from t2i_testing import tiny_ldm_overrides

from t2i.cli.evaluate import main, parse_options, prompt_of
from t2i.images import save_png

PROMPTS = ["a large red circle in the top left on a white background",
           "a small blue square in the center on a black background",
           "a large green triangle in the bottom right on a gray background"]


def _write_folder(folder: Path, images: torch.Tensor, prompts: list[str] | None) -> Path:
    """uint8 images as PNGs, the prompt in the PNG metadata as t2i.cli.generate writes it."""
    for i, image in enumerate(images):
        meta = {"prompt": prompts[i], "settings": "test"} if prompts else None
        save_png(image, folder / f"{i:05d}.png", meta)
    return folder


@pytest.fixture(scope="module")
def image_sets():
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(1, 3, 1, 1, generator=g) * 255).expand(40, 3, 32, 32).clone()
    blobs = torch.rand(40, 3, 8, 8, generator=g) * 255
    images = (base * 0.3 + torch.nn.functional.interpolate(blobs, size=32, mode="bilinear") * 0.7)
    noised = images + torch.randn(images.shape, generator=g) * 60
    return images.round().to(torch.uint8), noised.clamp(0, 255).round().to(torch.uint8)


def test_evaluate_same_folder_gives_zero_fid_and_noised_a_larger_one(tmp_path, image_sets, tiny_clip_export,
                                                                      single_thread, capsys):
    images, noised = image_sets
    prompts = [PROMPTS[i % 3] for i in range(len(images))]
    gen = _write_folder(tmp_path / "gen", images, prompts)
    real = _write_folder(tmp_path / "real", images.flip(0), None)  # the same set, in another order
    other = _write_folder(tmp_path / "noised", noised, prompts)
    out = tmp_path / "eval" / "results.json"
    same = main([f"generated={gen}", f"real={real}", f"clip_export={tiny_clip_export}", f"out={out}",
                 "batch_size=16", "device=cpu"])
    assert abs(same["domain_fid"]) < 1e-3
    assert 0.0 <= same["clip_score"] <= 100.0
    assert same["generated"] == {"path": str(gen), "images": 40, "with_prompt": 40, "without_prompt": 0}
    assert same["real"]["images"] == 40 and same["real"]["source"] == "folder" and same["resolution"] == 32
    assert "inception_fid" not in same
    assert json.loads(out.read_text()) == same
    printed = capsys.readouterr().out
    assert "domain FID" in printed and "CLIP score" in printed

    worse = main([f"generated={other}", f"real={real}", f"clip_export={tiny_clip_export}", "device=cpu"])
    assert worse["domain_fid"] > 1e-3 and worse["domain_fid"] > 100 * abs(same["domain_fid"])
    shuffled_pairs = main([f"generated={_write_folder(tmp_path / 'gen2', images, prompts[::-1])}", f"real={real}",
                           f"clip_export={tiny_clip_export}", "device=cpu"])
    assert abs(shuffled_pairs["domain_fid"]) < 1e-3  # FID ignores the prompts; the CLIP score does not
    assert 0.0 <= shuffled_pairs["clip_score"] <= 100.0


def test_evaluate_against_a_shard_set_and_prompts_from_txt_files(tmp_path, small_shapes, tiny_clip_export,
                                                                 single_thread):
    """Real images from the validation shards (read as validation reads them); generated PNGs without metadata
    take their prompt from the .txt beside them; noise is far from the shapes, shapes themselves close."""
    from t2i.eval.ldm_report import real_images
    shapes, captions = real_images(f"{small_shapes}/val/manifest.json", 32, 128)
    gen = _write_folder(tmp_path / "shapes_gen", shapes[64:], None)
    for i, caption in enumerate(captions[64:]):
        (gen / f"{i:05d}.txt").write_text(caption + "\n")
    noise = _write_folder(tmp_path / "noise", torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), None)
    common = [f"real={small_shapes}/val", f"clip_export={tiny_clip_export}", "max_real=64", "device=cpu"]
    halves = main([f"generated={gen}", *common])
    assert halves["real"] == {"path": f"{small_shapes}/val", "source": "shards", "images": 64}
    assert halves["generated"]["with_prompt"] == 64 and 0.0 <= halves["clip_score"] <= 100.0
    far = main([f"generated={noise}", *common])
    assert far["clip_score"] is None and far["generated"]["without_prompt"] == 64
    assert 0 < halves["domain_fid"] < far["domain_fid"] / 3


def test_prompts_and_options(tmp_path, tiny_clip_export):
    path = save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "a.png", {"prompt": "a red circle"})
    assert prompt_of(path, path.read_bytes()) == "a red circle"
    bare = save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "b.png")
    assert prompt_of(bare, bare.read_bytes()) is None
    with pytest.raises(SystemExit, match="give real="):
        parse_options([f"generated={tmp_path}", f"clip_export={tiny_clip_export}"])
    with pytest.raises(SystemExit, match="unknown option"):
        parse_options(["generated=x", "real=y", "clip_export=z", "fid=1"])
    opts = parse_options(["generated=x", "real=y", "clip_export=z", "normalize=false", "max_real=5"])
    assert opts.normalize is False and opts.max_real == 5 and opts.inception_weights is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        main([f"generated={tmp_path / 'empty'}", f"real={tmp_path}", f"clip_export={tiny_clip_export}"])
    with pytest.raises(SystemExit, match="error: stage export not found"):
        main([f"generated={tmp_path}", f"real={tmp_path}", f"clip_export={tmp_path / 'no-export'}"])
    with pytest.raises(SystemExit, match="error: Inception weights not found.*pt_inception"):
        main([f"generated={tmp_path}", f"real={tmp_path}", f"clip_export={tiny_clip_export}", "device=cpu",
              f"inception_weights={tmp_path / 'pt_inception-2015-12-05-6726825d.pth'}"])


def test_sample_metrics_callback_logs_domain_fid_and_clip_score(small_shapes, tiny_vae_export, tiny_clip_export,
                                                                tmp_path, single_thread):
    from t2i.cli.config import compose_config
    from t2i.cli.train import train
    run = tmp_path / "ldm"
    cb = "+callbacks.sample_metrics"
    result = train(compose_config(tiny_ldm_overrides(
        small_shapes, tiny_vae_export, run, "trainer.max_steps=2", "trainer.val_check_interval=2",
        f"{cb}._target_=t2i.callbacks.sample_metrics.SampleMetrics", f"{cb}.clip_export={tiny_clip_export}",
        f"{cb}.num_samples=12", f"{cb}.steps=2", f"{cb}.batch_size=8")))
    for name in ("val/domain_fid", "val/clip_score"):
        assert math.isfinite(result.metrics[name]), name  # the final validation's (also in stage.json)
    assert result.metrics["val/domain_fid"] >= 0 and 0 <= result.metrics["val/clip_score"] <= 100
    stage = json.loads((result.export_dir / "stage.json").read_text())
    assert stage["metrics"]["val/domain_fid"] == pytest.approx(result.metrics["val/domain_fid"])
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/domain_fid")]
    assert len(rows) >= 1  # the validation during fit (step 2)
    assert all(math.isfinite(float(r["val/domain_fid"])) and math.isfinite(float(r["val/clip_score"])) for r in rows)
