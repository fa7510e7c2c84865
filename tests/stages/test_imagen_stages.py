"""The Imagen / GLIDE stages on the one diffusion path: fast_dev_run of the tiny base and SR experiments
(frozen CLIP text tower with precomputed states, or a text encoder trained jointly), what reaches the networks
(noise-conditioning levels in training and at sampling, precomputed vs live text states), and the cascade."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from t2i_testing import (
    TOY_STAGE_OVERRIDES,
    base_overrides,
    load_data_prep,
    load_toy_recipe,
    recipe_strategy_overrides,
    sr_overrides,
)

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.conditioning.precomputed import precomputed_text_condition
from t2i.exports import ExportError, read_export
from t2i.pipelines.cascade import CascadePipeline
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.upsampler import UpsamplerPipeline
from t2i.stages.conditioners import text_cond

PROMPTS = ["a small red circle in the top on a black background", "a large blue square in the left on a white background"]


@pytest.fixture(scope="module")
def text_shards(small_shapes, tiny_clip_export, tmp_path_factory):
    """The small shapes set with text_tokens / text_mask / text_pooled written by data_prep/encode_text.py."""
    out = tmp_path_factory.mktemp("text_shards")
    encode = load_data_prep("encode_text")
    for split in ("train", "val"):
        encode.main(["--clip", str(tiny_clip_export), "--shards", str(small_shapes / split), "--out",
                     str(out / split), "--tokens", "16", "--batch", "64", "--device", "cpu"])
    return out


@pytest.fixture(scope="module")
def cascades(text_shards, small_shapes, tiny_clip_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascades")
    out = {}
    for kind, shards in (("imagen", text_shards), ("glide", small_shapes)):
        out[kind] = {
            "base": train(compose_config(base_overrides(kind, root / f"{kind}_base", shards, tiny_clip_export,
                                                        "trainer.fast_dev_run=true"))).export_dir,
            "sr": train(compose_config(sr_overrides(kind, root / f"{kind}_sr", shards, tiny_clip_export,
                                                    "trainer.fast_dev_run=true"))).export_dir}
    out["root"] = root
    return out


@pytest.mark.parametrize("kind", ["imagen", "glide"])
def test_cascade_exports_and_pipeline(cascades, kind):
    base, sr = read_export(cascades[kind]["base"], stage="base"), read_export(cascades[kind]["sr"], stage="sr")
    trained_text = {"text_encoder"} if kind == "glide" else set()  # a frozen tower is not exported
    assert {k.split(".")[0] for k in base.state_dict()} == {"denoiser", "cond_dropout", *trained_text}
    assert {k.split(".")[0] for k in sr.state_dict()} == {"denoiser", "cond_dropout", *trained_text}  # no weights in degradation
    assert list((cascades["root"] / f"{kind}_base" / "samples").glob("samples_final_*.png"))
    pipe = CascadePipeline.from_exports(cascades[kind]["base"], [cascades[kind]["sr"]])
    assert vars(pipe.settings.base) == base.config["model"]["sampler"] | {"sampler": "ddim", "spacing": "leading"}
    small, large = pipe.stages(PROMPTS, seed=0)
    assert small.shape == (2, 3, 16, 16) and large.shape == (2, 3, 64, 64)
    assert small.abs().max() <= 1 and large.abs().max() <= 1
    torch.testing.assert_close(pipe(PROMPTS, seed=0), large)  # deterministic for a seed


def test_cascade_refuses_mismatched_resolutions(cascades):
    base = CascadePipeline.from_exports(cascades["imagen"]["base"]).base
    sr = UpsamplerPipeline.from_export(cascades["imagen"]["sr"], stage="sr")
    sr.low_res = 32
    with pytest.raises(ExportError, match="32px inputs"):
        CascadePipeline(base, [sr])
    with pytest.raises(ExportError, match="a 'sr' export, expected a 'base'"):
        CascadePipeline.from_exports(cascades["imagen"]["sr"])


def test_precomputed_text_equals_the_frozen_encoder(text_shards, tiny_clip_export, tmp_path):
    """The states written into the shards condition the base model as the live encoder would (fp16 storage)."""
    cfg = compose_config(base_overrides("imagen", tmp_path / "b", text_shards, tiny_clip_export))
    stage, dm = instantiate(cfg.model), instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.loader(dm.val_data, train=False, rank=0, world=1)))
    batch = dm.on_after_batch_transfer(batch, 0)
    assert {"text_tokens", "text_mask", "text_pooled"} <= set(batch)
    pre = text_cond(batch, stage.net, stage.frozen_text_encoder, "cpu")
    live = text_cond({"caption": batch["caption"]}, stage.net, stage.frozen_text_encoder, "cpu")
    n = pre.context.shape[1]
    assert torch.equal(pre.context_mask, live.context_mask[:, :n]) and not live.context_mask[:, n:].any()
    keep = pre.context_mask[..., None]
    torch.testing.assert_close(pre.context * keep, live.context[:, :n] * keep, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(pre.vector, live.vector)
    with pytest.raises(ValueError, match="another text encoder"):
        precomputed_text_condition(batch, width=pre.context.shape[-1] + 1, pooled_dim=None)
    with pytest.raises(ValueError, match="needs all of"):
        text_cond({"caption": batch["caption"], "text_tokens": batch["text_tokens"]}, stage.net,
                  stage.frozen_text_encoder, "cpu")


def test_trained_text_encoder_refuses_precomputed_states(text_shards, tiny_clip_export, tmp_path):
    cfg = compose_config(base_overrides("glide", tmp_path / "g", text_shards, tiny_clip_export,
                                        "data.array_fields=[text_tokens.npy,text_mask.npy,text_pooled.npy]",
                                        "trainer.fast_dev_run=true"))
    with pytest.raises(ValueError, match="stale"):
        train(cfg)


def test_noise_conditioning_level_reaches_the_network(text_shards, tiny_clip_export, cascades, tmp_path):
    """Training: a random level per sample, the low-res input noised at it, the same levels given to the
    network. Sampling: the fixed level at every step (or the one asked for)."""
    cfg = compose_config(sr_overrides("imagen", tmp_path / "s", text_shards, tiny_clip_export,
                                      "model.degradation.noise_prob=1.0"))
    stage = instantiate(cfg.model)
    seen = []
    stage.net["denoiser"].register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["vector"].clone()),
                                                with_kwargs=True)
    stage.net.train()
    high = torch.rand(8, 3, 64, 64) * 2 - 1
    stage.loss({"image": high, "caption": PROMPTS * 4}, stage.net)
    levels = seen[-1][:, 0]
    lo, hi = stage.net["degradation"].noise_level
    assert levels.unique().numel() == 8 and ((levels >= lo) & (levels <= hi)).all()
    sr = UpsamplerPipeline.from_export(cascades["imagen"]["sr"], stage="sr")
    seen.clear()
    sr.net["denoiser"].register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["vector"].clone()),
                                             with_kwargs=True)
    sr(torch.zeros(2, 3, 16, 16), SamplerSettings(steps=3, guidance_scale=1.0), prompts=PROMPTS, seed=0)
    trained = sr.net["degradation"].sample_noise_level
    assert trained == sr.config["model"]["degradation"]["sample_noise_level"] > 0 and len(seen) == 3
    assert all(torch.all(v[:, 0] == trained) and torch.all(v[:, 1] == 0) for v in seen)
    seen.clear()
    sr(torch.zeros(2, 3, 16, 16), SamplerSettings(steps=3), prompts=PROMPTS, seed=0, noise_level=0.0)
    assert all(torch.all(v[:, 0] == 0) for v in seen)
    assert sr.net["degradation"].sample_noise_level == trained  # the override does not stick
    with pytest.raises(ValueError, match="text-conditioned"):
        sr(torch.zeros(2, 3, 16, 16), seed=0)


def test_generate_cli_imagen(cascades, tmp_path):
    from t2i.cli.generate import main
    out = tmp_path / "gen"
    main(["pipeline=imagen", f"base_export={cascades['imagen']['base']}", f"sr_exports={cascades['imagen']['sr']}",
          f"prompt={PROMPTS[0]}", f"out_dir={out}", "steps=2", "sr_steps=2", "thresholding=static", "device=cpu"])
    (png,) = out.glob("*.png")
    from PIL import Image
    with Image.open(png) as img:
        assert img.size == (64, 64) and "thresholding=static" in img.text["settings"]
    main(["pipeline=glide", f"base_export={cascades['glide']['base']}", "sr_exports=none", f"prompt={PROMPTS[1]}",
          f"out_dir={out}/small", "steps=2", "device=cpu"])
    (png,) = (out / "small").glob("*.png")
    with Image.open(png) as img:
        assert img.size == (16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["default", "zero3_cpu"])
def test_imagen_recipe_end_to_end(small_shapes, tmp_path, strategy, monkeypatch):
    """recipes/imagen.yaml at toy sizes: CLIP -> text states -> base -> SR -> classifier -> report."""
    import yaml

    from t2i.cli.recipe import RecipeRunner
    recipe, steps = load_toy_recipe("imagen")
    small = list(TOY_STAGE_OVERRIDES)
    for name in ("clip", "classifier"):
        steps[name]["overrides"] = [f"run_dir={tmp_path}/{name}", f"data.train_manifest={small_shapes}/train",
                                    f"data.val_manifest={small_shapes}/val", *small]
    for name in ("text_train", "text_val"):
        steps[name]["run"] = [a.replace("data/shapes", str(small_shapes)).replace("data/text-", f"{tmp_path}/text-")
                              for a in steps[name]["run"]]
    for name in ("base", "sr"):
        steps[name]["overrides"] = [o.replace("data/text-", f"{tmp_path}/text-") for o in steps[name]["overrides"]]
        steps[name]["overrides"] += [f"run_dir={tmp_path}/{name}", *small, "model.sampler.steps=2"]
    steps["evaluate"]["args"].update(val_manifest=str(small_shapes / "val"), num_prompts=4, num_real=4,
                                     table_steps=2, classifier_scales=[0, 1])
    path = tmp_path / "imagen.yaml"
    path.write_text(yaml.safe_dump(recipe))
    exports = RecipeRunner(str(path), recipe_strategy_overrides(strategy, monkeypatch)).run()
    report = (tmp_path / "base" / "eval" / "report.md").read_text()
    assert "full cascade" in report and "dynamic" in report and "classifier guidance" in report
    assert (tmp_path / "base" / "eval" / "guidance_x_thresholding.png").is_file()
    assert set(exports) == {"clip", "base", "sr", "classifier"}
