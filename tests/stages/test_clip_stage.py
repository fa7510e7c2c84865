"""The CLIP stage: trains and exports through `train(cfg)` (fast_dev_run and a few steps), exports a
pretrained open_clip checkpoint unchanged with trainer.max_steps=0, refuses a wrong checkpoint clearly."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import partial

import open_clip
import pytest
import torch
from t2i_testing import REPO, TINY_CLIP_CONFIG, tiny_clip_overrides

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.conditioning.clip import ClipImageEncoder, build_clip, clip_export_model_config
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.exports import read_export
from t2i.stages.clip import ClipStage

CAPTIONS = ["a large red circle in the top left on a white background",
            "a small blue square in the center on a black background"]


def _tiny_config() -> dict:
    return dict(compose_config(["experiment=tiny/clip", f"model.clip_config={TINY_CLIP_CONFIG}"]).model.clip_config)


def _stage(**kw) -> ClipStage:
    return ClipStage(partial(torch.optim.AdamW, lr=1e-3), clip_config=_tiny_config(), **kw)


def test_fast_dev_run_exports_a_rebuildable_open_clip_model(small_shapes, tmp_path):
    result = train(compose_config(tiny_clip_overrides(small_shapes, tmp_path / "run", "trainer.fast_dev_run=true")))
    export = read_export(result.export_dir, stage="clip")
    sd = export.state_dict()
    assert {"logit_scale", "text_projection", "token_embedding.weight", "positional_embedding",
            "ln_final.weight", "visual.proj", "visual.conv1.weight"} <= set(sd)
    assert all(k.startswith(("visual.", "transformer.", "ln_final.", "token_embedding.")) or "." not in k
               for k in sd)  # open_clip's own names, unprefixed
    model = open_clip.model.CLIP(**clip_export_model_config(export))
    model.load_state_dict(sd, strict=True)  # the export alone rebuilds the model
    assert export.metrics["embed_dim"] == 32 and export.metrics["image_size"] == 32
    assert export.metrics["context_length"] == 24
    assert {"val/i2t_r1", "val/i2t_r5", "val/t2i_r1", "val/t2i_r5"} <= set(export.metrics)
    assert export.config["model"]["clip_config"]["vision_cfg"]["patch_size"] == 8


def test_a_few_steps_learn_and_validate_retrieval(small_shapes, tmp_path, single_thread):
    result = train(compose_config(tiny_clip_overrides(
        small_shapes, tmp_path / "run", "trainer.max_steps=25", "trainer.val_check_interval=25",
        "data.batch_size=32", "model.optimizer.lr=3e-3", "model.lr_scheduler.warmup_steps=5")))
    m = result.metrics
    assert m["train/loss"] < math.log(32) - 0.2  # below chance for a batch of 32
    for k in ("val/i2t_r1", "val/i2t_r5", "val/t2i_r1", "val/t2i_r5"):
        assert 0.0 <= m[k] <= 1.0
    assert m["val/samples"] == 64 and m["val/i2t_r5"] >= m["val/i2t_r1"]
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()


def test_empty_batch_is_a_zero_step_and_logit_scale_is_clamped():
    stage = _stage()
    loss = stage.training_step({"image": torch.zeros(0, 3, 32, 32), "caption": []}, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in stage.clip.parameters())
    with torch.no_grad():
        stage.clip.logit_scale.fill_(7.0)
    optimizer = torch.optim.SGD(stage.clip.parameters(), lr=0.0)
    stage.optimizer_step(0, 0, optimizer, lambda: None)  # clamped right after the step, before checkpoints
    assert stage.clip.logit_scale.item() == pytest.approx(math.log(100))


def test_pretrained_checkpoint_is_exported_unchanged_with_max_steps_0(small_shapes, tmp_path):
    torch.manual_seed(3)
    model = build_clip(_stage().spec).eval().requires_grad_(False)
    path = tmp_path / "open_clip.pt"
    torch.save(model.state_dict(), path)
    result = train(compose_config(tiny_clip_overrides(small_shapes, tmp_path / "run", f"model.checkpoint_path={path}",
                                                      experiment="clip/pretrained")))
    export = read_export(result.export_dir, stage="clip")
    assert export.info["global_step"] == 0
    assert not (result.run_dir / "checkpoints" / "last.ckpt").exists()  # nothing trained, nothing to resume
    for k, v in model.state_dict().items():
        assert torch.equal(export.state_dict()[k], v), k
    assert {"val/i2t_r1", "val/t2i_r5", "val/loss"} <= set(export.metrics)  # the final validation ran
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = pixels.float() / 127.5 - 1
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    expected = model.encode_image((pixels.float() / 255 - mean) / std)
    torch.testing.assert_close(ClipImageEncoder.from_clip_export(export.path)(x), expected, atol=1e-5, rtol=1e-5)
    text = OpenClipTextEncoder.from_clip_export(export.path)
    assert torch.equal(text(CAPTIONS).pooled, model.encode_text(open_clip.tokenize(CAPTIONS, context_length=24)))


def test_wrong_checkpoint_is_refused_with_the_keys(tmp_path):
    sd = dict(build_clip(_stage().spec).state_dict())
    sd.pop("text_projection")
    sd["visual.head.weight"] = torch.zeros(2)
    sd["token_embedding.weight"] = torch.zeros(10, 32)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys \['text_projection'\], unexpected keys "
                                         r"\['visual.head.weight'\], shape mismatches \['token_embedding.weight"):
        _stage(checkpoint_path=str(path))
    with pytest.raises(FileNotFoundError):
        _stage(checkpoint_path=str(tmp_path / "nope.pt"))


def test_two_process_ddp_clip_run(small_shapes, tmp_path):
    """Features gathered across 2 ranks (gloo), retrieval gathered from both ranks' validation shards."""
    run = tmp_path / "ddp"
    args = tiny_clip_overrides(small_shapes, run, "trainer.devices=2", "strategy=ddp", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "trainer.precision=32", "trainer.limit_val_batches=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = read_export(run / "export", stage="clip")
    assert export.info["global_step"] == 2 and export.metrics["val/samples"] == 128  # 2 ranks x 4 x 16
