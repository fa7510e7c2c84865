"""The unCLIP stages on the one diffusion path: fast_dev_run of the tiny prior, decoder and upsampler
experiments, what their exports hold, the upsampler's training-only degradation, and the chain pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from t2i_testing import (
    TOY_STAGE_OVERRIDES,
    clip_dims,
    decoder_overrides,
    load_toy_recipe,
    prior_overrides,
    recipe_strategy_overrides,
    upsampler_overrides,
)

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.conditioning.lowres import downsample
from t2i.conditioning.text_encoding import clip_text_condition
from t2i.exports import ExportError, read_export
from t2i.pipelines.decoder import DecoderPipeline
from t2i.pipelines.prior import PriorPipeline
from t2i.pipelines.unclip import UnclipPipeline
from t2i.pipelines.upsampler import UpsamplerPipeline


@pytest.fixture(scope="module")
def unclip_exports(clip_shards, tiny_clip_export, small_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    prior = train(compose_config(prior_overrides(root / "prior", clip_shards, tiny_clip_export,
                                                 "trainer.fast_dev_run=true"))).export_dir
    decoder = train(compose_config(decoder_overrides(root / "decoder", clip_shards, tiny_clip_export,
                                                     "trainer.fast_dev_run=true"))).export_dir
    upsampler = train(compose_config(upsampler_overrides(root / "upsampler", small_shapes,
                                                         "trainer.fast_dev_run=true"))).export_dir
    return {"prior": prior, "decoder": decoder, "upsampler": upsampler, "root": root}


def test_prior_export_and_validation_metrics(unclip_exports):
    export = read_export(unclip_exports["prior"], stage="prior")
    prefixes = {k.split(".")[0] for k in export.state_dict()}
    assert prefixes == {"denoiser", "cond_dropout", "embedding_scale"}
    assert {"val/cos_prior", "val/cos_text", "val/cos_shuffled", "val/loss"} <= set(export.metrics)
    pipe = PriorPipeline.from_export(unclip_exports["prior"])
    emb = pipe(["a small red circle in the top on a black background"] * 2, seed=0, best_of=2)
    assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_prior_best_of_keeps_the_most_text_similar_sample(unclip_exports):
    pipe = PriorPipeline.from_export(unclip_exports["prior"])
    prompts = ["a large blue square in the left on a gray background", "a small green triangle in the top on a white background"]
    best = pipe(prompts, seed=3, best_of=3)
    candidates = pipe([p for p in prompts for _ in range(3)], seed=3, best_of=1).reshape(2, 3, -1)
    _, text = clip_text_condition(pipe.text_encoder, prompts)
    pick = (candidates * text[:, None]).sum(-1).argmax(1)
    torch.testing.assert_close(best, candidates[torch.arange(2), pick])


def test_prior_dataset_scaling_is_measured_and_exported(clip_shards, tiny_clip_export, tmp_path):
    result = train(compose_config(prior_overrides(tmp_path / "p", clip_shards, tiny_clip_export,
                                                  "trainer.max_steps=1", "final_validation=false",
                                                  "model.embedding_scale.mode=dataset")))
    sd = read_export(result.export_dir).state_dict()
    assert bool(sd["embedding_scale.fitted"])
    assert not torch.allclose(sd["embedding_scale.std"], torch.full_like(sd["embedding_scale.std"],
                                                                         sd["embedding_scale.std"][0]))
    pipe = PriorPipeline.from_export(result.export_dir)
    e = F.normalize(torch.randn(4, pipe.net["embedding_scale"].embed_dim), dim=-1)
    scale = pipe.net["embedding_scale"]
    torch.testing.assert_close(scale.decode(scale.encode(e)), e, atol=1e-5, rtol=0)


def test_decoder_export_and_pipeline(unclip_exports):
    export = read_export(unclip_exports["decoder"], stage="decoder")
    assert {k.split(".")[0] for k in export.state_dict()} == {"denoiser", "cond_dropout"}
    assert any(k.startswith("denoiser.image_tokens.") for k in export.state_dict())
    assert list((unclip_exports["root"] / "decoder" / "samples").glob("samples_final_*.png"))
    pipe = DecoderPipeline.from_export(unclip_exports["decoder"])
    embeds = F.normalize(torch.randn(2, pipe.net["denoiser"].embed_dim), dim=-1)
    images = pipe(embeds, ["a small red circle in the top on a black background"] * 2, seed=0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert pipe(embeds, None, seed=0).shape == images.shape  # image variations: the text is nulled
    cond = pipe.condition(embeds, None)
    null = pipe.net["cond_dropout"].null_context[0]
    assert torch.equal(cond.vector, embeds) and cond.context_mask.sum(1).tolist() == [1, 1]
    torch.testing.assert_close(cond.context[:, 0], null.expand(2, -1))


def test_decoder_from_the_caption_alone_uses_the_learned_null_embedding(unclip_exports):
    """Ramesh et al. 2022 Fig. 9's first row: the caption with the null image embedding the decoder was trained with
    when the embedding was dropped; the caption's tokens are kept."""
    pipe = DecoderPipeline.from_export(unclip_exports["decoder"])
    prompts = ["a small red circle in the top on a black background", "a large blue square in the left on a gray background"]
    cond = pipe.condition(None, prompts)
    dropout = pipe.net["cond_dropout"]
    embeds = F.normalize(torch.randn(2, pipe.net["denoiser"].embed_dim), dim=-1)
    with_embedding = pipe.condition(embeds, prompts)
    torch.testing.assert_close(cond.vector, dropout.null_like(with_embedding).vector)
    assert not torch.equal(cond.vector, with_embedding.vector)
    torch.testing.assert_close(cond.context, with_embedding.context)  # the text is not dropped
    images = pipe(None, prompts, seed=0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    with pytest.raises(ValueError, match="needs the prompts"):
        pipe(None, None)


def test_upsampler_degrades_low_res_in_training_only(small_shapes, tmp_path):
    cfg = compose_config(upsampler_overrides(tmp_path / "u", small_shapes, "model.degradation.blur_prob=1.0",
                                             "model.degradation.noise_prob=1.0"))
    stage = instantiate(cfg.model)
    high = torch.rand(4, 3, 64, 64) * 2 - 1
    clean = downsample(high, 16)
    stage.net.train()
    x0, cond = stage.inputs({"image": high}, stage.net)
    assert x0.shape == (4, 3, 16, 16) and cond.concat.shape == (4, 3, 4, 4)  # aligned random crops
    assert (cond.vector[:, 0] > 0).all() and (cond.vector[:, 1] > 0).all()
    x0, cond = stage.inputs({"image": high}, stage.inference_net)  # the EMA net: what sampling sees
    assert torch.equal(x0, high) and torch.equal(cond.concat, clean)
    assert torch.equal(cond.vector, torch.zeros(4, 2))


def test_upsampler_pipeline_and_full_chain(unclip_exports):
    ups = UpsamplerPipeline.from_export(unclip_exports["upsampler"])
    assert ups(torch.zeros(2, 3, 16, 16), seed=0).shape == (2, 3, 64, 64)
    pipe = UnclipPipeline.from_exports(unclip_exports["prior"], unclip_exports["decoder"],
                                       unclip_exports["upsampler"])
    pipe.settings.prior.steps = pipe.settings.decoder.steps = pipe.settings.upsampler.steps = 2
    images = pipe(["a small red circle in the top on a black background"], seed=0)
    assert images.shape == (1, 3, 64, 64)
    assert pipe.variations(images, num_variations=2).shape == (2, 3, 64, 64)


def test_chain_refuses_a_mismatched_upsampler(unclip_exports, small_shapes, tmp_path):
    other = train(compose_config(upsampler_overrides(tmp_path / "u32", small_shapes, "trainer.fast_dev_run=true",
                                                     "model.conditioner.low_res=32", "model.conditioner.crop_size=null"))).export_dir
    with pytest.raises(ExportError, match="32px inputs"):
        UnclipPipeline.from_exports(unclip_exports["prior"], unclip_exports["decoder"], other)


def test_decoder_refuses_embeddings_of_another_width(clip_shards, tiny_clip_export, tmp_path):
    from hydra.errors import InstantiationException
    embed, _ = clip_dims(tiny_clip_export)
    with pytest.raises((ValueError, InstantiationException), match="incompatible input.*embed_dim"):
        train(compose_config(decoder_overrides(tmp_path / "d", clip_shards, tiny_clip_export,
                                               "trainer.fast_dev_run=true", f"model.denoiser.embed_dim={embed + 1}")))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["default", "zero3_cpu"])
def test_unclip_recipe_end_to_end(small_shapes, tmp_path, strategy, monkeypatch):
    """recipes/unclip.yaml's chain at toy sizes: CLIP -> embeddings -> prior -> decoder -> upsampler -> report."""
    import yaml

    from t2i.cli.recipe import RecipeRunner
    recipe, steps = load_toy_recipe("unclip")
    small = list(TOY_STAGE_OVERRIDES)
    steps["clip"]["overrides"] = [f"run_dir={tmp_path}/clip", f"data.train_manifest={small_shapes}/train",
                                  f"data.val_manifest={small_shapes}/val", *small]
    for name in ("embed_train", "embed_val"):
        split = "train" if name == "embed_train" else "val"
        steps[name]["run"] = [a.replace("data/shapes", str(small_shapes)).replace("data/clip-", f"{tmp_path}/clip-")
                              for a in steps[name]["run"]]
        assert steps[name]["run"][-1].endswith(split)
    for name in ("prior", "decoder"):
        steps[name]["overrides"] = [o.replace("data/clip-", f"{tmp_path}/clip-") for o in steps[name]["overrides"]]
        steps[name]["overrides"] += [f"run_dir={tmp_path}/{name}", *small, "model.sampler.steps=2"]
    steps["prior"]["overrides"] += ["model.preview.batches=1"]
    steps["upsampler"]["overrides"] = [f"run_dir={tmp_path}/upsampler", f"data.train_manifest={small_shapes}/train",
                                       f"data.val_manifest={small_shapes}/val", *small, "model.sampler.steps=2"]
    steps["evaluate"]["args"].update(val_manifest=str(small_shapes / "val"), num_prompts=4, num_real=4)
    path = tmp_path / "unclip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    exports = RecipeRunner(str(path), recipe_strategy_overrides(strategy, monkeypatch)).run()
    report = (tmp_path / "decoder" / "eval" / "report.md").read_text()
    assert "full chain" in report and "prior samples" in report
    assert (tmp_path / "decoder" / "eval" / "variations.png").is_file()
    assert set(exports) == {"clip", "prior", "decoder", "upsampler"}


def test_generate_command_with_the_unclip_pipeline(unclip_exports, tmp_path):
    from PIL import Image

    from t2i.cli.generate import main
    common = ["pipeline=unclip", f"prior_export={unclip_exports['prior']}",
              f"decoder_export={unclip_exports['decoder']}", f"upsampler_export={unclip_exports['upsampler']}",
              "steps=2", "prior_steps=2", "upsampler_steps=2", "best_of=1", "device=cpu"]
    main([*common, "prompt=a small red circle in the top on a black background", f"out_dir={tmp_path}/gen"])
    [png] = sorted((tmp_path / "gen").glob("*.png"))
    with Image.open(png) as img:
        assert img.size == (64, 64) and "prompt" in img.info
    main([*common, f"image={png}", "num_images=2", f"out_dir={tmp_path}/var"])
    assert len(list((tmp_path / "var").glob("*-variation-*.png"))) == 2
    main([*common, "upsampler_export=none", "prompt=a small red circle in the top on a black background",
          f"out_dir={tmp_path}/small"])
    with Image.open(next((tmp_path / "small").glob("*.png"))) as img:
        assert img.size == (16, 16)
