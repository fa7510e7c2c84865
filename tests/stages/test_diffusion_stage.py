"""The LDM stage through train(cfg): it trains, exports what the pipeline loads, and refuses an
incompatible first stage with a clear message."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from t2i_testing import tiny_ldm_overrides

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.exports import read_export
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline


def test_fast_dev_run_trains_and_exports(small_shapes, tiny_vae_export, tmp_path):
    result = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run",
                                                     "trainer.fast_dev_run=true")))
    export = read_export(result.export_dir, stage="ldm")
    keys = export.state_dict().keys()
    assert any(k.startswith("denoiser.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert "cond_dropout.null_context" in keys
    assert result.metrics["train/loss"] > 0


def test_export_generates_images_reproducibly(tiny_ldm_export):
    pipe = TextToImagePipeline.from_export(tiny_ldm_export)
    settings = SamplerSettings(steps=3, guidance_scale=2.0)
    prompts = ["a large red circle in the top left on a white background"] * 2
    a = pipe(prompts, settings, seed=1)
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, pipe(prompts, settings, seed=1))
    assert not torch.equal(a, pipe(prompts, settings, seed=2))


def test_export_holds_the_ema_weights(small_shapes, tiny_vae_export, tmp_path):
    result = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run",
                                                     "trainer.max_steps=3", "final_validation=false",
                                                     "model.ema_decay=0.5", "model.ema_warmup=false")))
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    exported = read_export(result.export_dir).state_dict()
    name = "denoiser.out.2.weight"
    torch.testing.assert_close(exported[name], ckpt[f"ema.module.{name}"])
    assert not torch.equal(ckpt[f"ema.module.{name}"], ckpt[f"net.{name}"])


def test_incompatible_first_stage_is_refused(small_shapes, tiny_vae_export, tmp_path):
    cfg = compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run",
                                            "model.denoiser.in_channels=3", "model.denoiser.out_channels=3"))
    with pytest.raises((ValueError, InstantiationException), match="incompatible input.*4-channel"):
        train(cfg)


def test_missing_first_stage_export_is_a_clear_error(small_shapes, tmp_path):
    cfg = compose_config(tiny_ldm_overrides(small_shapes, tmp_path / "no-vae", tmp_path / "run"))
    with pytest.raises((FileNotFoundError, RuntimeError, InstantiationException), match="no-vae"):
        train(cfg)


def test_ema_updates_once_per_optimizer_step(small_shapes, tiny_vae_export, tmp_path):
    result = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run",
                                                     "trainer.max_steps=2", "trainer.accumulate_grad_batches=3",
                                                     "final_validation=false", "export=false")))
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and int(ckpt["state_dict"]["ema.num_updates"]) == 2
