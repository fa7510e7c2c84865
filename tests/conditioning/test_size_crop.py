"""SDXL's size/crop micro-conditioning: the ids, their embedding, and a text-to-image stage and its pipeline that
take it (the network-level equivalence with diffusers' text_time layout is in tests/interop/test_sd_unet.py)."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from t2i_testing import tiny_ldm_overrides

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.conditioning.size_crop import size_crop_embedding, size_crop_ids
from t2i.nn.embeddings import timestep_embedding
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline

SIZED = ("model.conditioner.size_embedding=8", "model.denoiser.vector_dim=48")


def test_ids_default_to_an_uncropped_image_of_the_target_size():
    ids = size_crop_ids(2, (64, 96))
    assert ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    ids = size_crop_ids(1, (64, 96), torch.tensor([[480, 640]]), torch.tensor([[3, 5]]))
    assert ids.tolist() == [[480, 640, 3, 5, 64, 96]]
    emb = size_crop_embedding(ids, 8)
    assert emb.shape == (1, 48) and torch.equal(emb[0, 16:24], timestep_embedding(torch.tensor([3.0]), 8)[0])
    with pytest.raises(ValueError, match=r"original_size of shape \(2,\), expected \(1, 2\)"):
        size_crop_ids(1, (64, 96), torch.tensor([480, 640]))


def test_the_stage_appends_the_sizes_to_the_vector(small_shapes, tiny_vae_export, tmp_path):
    stage = instantiate(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path, *SIZED)).model)
    assert stage.conditioner.pooled is False  # a vector of sizes alone: the pooled text embedding is left out
    assert not any(p.requires_grad for p in stage.net["text_encoder"].parameters_unused_without_pooled())
    image = torch.zeros(2, 3, 32, 32)
    _, cond = stage.inputs({"image": image, "caption": ["a red circle"] * 2}, stage.net)
    assert torch.equal(cond.vector, size_crop_embedding(size_crop_ids(2, (32, 32)), 8))
    _, cropped = stage.inputs({"image": image, "caption": ["a red circle"] * 2, "original_size": torch.tensor(
        [[48, 32], [32, 32]]), "crop_top_left": torch.tensor([[16, 0], [0, 0]])}, stage.net)
    assert not torch.equal(cropped.vector[0], cond.vector[0]) and torch.equal(cropped.vector[1], cond.vector[1])


def test_a_vector_that_fits_neither_layout_is_refused(small_shapes, tiny_vae_export, tmp_path):
    cfg = compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path,
                                            "model.conditioner.size_embedding=8", "model.denoiser.vector_dim=50"))
    with pytest.raises(InstantiationException, match="vector_dim 50 must be 6 x 8"):
        instantiate(cfg.model)


def test_the_exported_pipeline_samples_with_the_sizes_asked(small_shapes, tiny_vae_export, tmp_path):
    export = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run", *SIZED,
                                                     "trainer.fast_dev_run=true"))).export_dir
    pipe = TextToImagePipeline.from_export(export)
    assert pipe.size_embedding == 8
    settings = SamplerSettings(steps=2, guidance_scale=1.0)
    plain = pipe(["a red circle"], settings, seed=0)
    assert torch.equal(plain, pipe(["a red circle"], settings, seed=0, original_size=(32, 32)))  # the default
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # one step leaves the UNet at its start, whose zero output layers hide every input
        for p in pipe.net["denoiser"].parameters():
            p.normal_(0, 0.2, generator=gen)
    plain = pipe(["a red circle"], settings, seed=0)
    assert not torch.equal(plain, pipe(["a red circle"], settings, seed=0, crop_top_left=(16, 16)))
    wide = pipe(["a red circle"], settings, seed=0, height=16, width=48)  # non-square: the target size follows
    assert wide.shape == (1, 3, 16, 48)
    by_default = pipe.condition(["a"], size=(16, 48)).vector
    assert torch.equal(by_default, pipe.condition(["a"], (16, 48), (0, 0), (16, 48)).vector)
    with pytest.raises(ValueError, match=r"multiples of 16 \(the VAE's 4 x the UNet's 4\)"):
        pipe(["a red circle"], settings, height=20)


def test_a_model_without_size_conditioning_refuses_sizes(tiny_ldm_export):
    pipe = TextToImagePipeline.from_export(tiny_ldm_export)
    with pytest.raises(ValueError, match="takes no size/crop conditioning"):
        pipe(["a red circle"], SamplerSettings(steps=2), crop_top_left=(4, 4))


def test_the_diffusers_export_says_how_to_feed_the_sizes(small_shapes, tiny_vae_export, tmp_path):
    pytest.importorskip("diffusers")
    from t2i.interop.diffusers_export import export_diffusers
    export = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run", *SIZED,
                                                     "trainer.fast_dev_run=true"))).export_dir
    result = export_diffusers(export, tmp_path / "diffusers", text_encoder="skip", verify=False)
    assert any("size/crop micro-conditioning (8 features per number" in w and "text_time" in w
               for w in result.warnings)


@pytest.mark.parametrize("pixel_scale", [1, 4])
def test_the_target_size_is_the_batch_bucket_not_the_square(monkeypatch, pixel_scale):
    """A bucketed batch's target size is its own (x0's size times the target's pixels per position), so a 16x64
    batch is told 16x64, not the stage's square image_size."""
    from types import SimpleNamespace

    from t2i.conditioning.cond import Cond
    from t2i.stages import conditioners

    text = conditioners.Text(size_embedding=8)
    text.setup(SimpleNamespace(vector_dim=48), SimpleNamespace(pooled_dim=16), {}, 32, pixel_scale=pixel_scale)
    monkeypatch.setattr(conditioners, "text_cond", lambda *a, **k: Cond(vector=torch.zeros(2, 0)))
    x0 = torch.zeros(2, 4, 16 // pixel_scale, 64 // pixel_scale)
    original, crop = torch.tensor([[20, 80], [30, 90]]), torch.tensor([[0, 3], [1, 0]])
    _, cond = text({"original_size": original, "crop_top_left": crop}, x0, None, None)
    want = size_crop_embedding(size_crop_ids(2, (16, 64), original, crop), 8)
    torch.testing.assert_close(cond.vector, want)
