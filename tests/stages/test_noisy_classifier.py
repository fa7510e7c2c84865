"""Classifier guidance (Dhariwal & Nichol 2021): the noisy-image classifier stage (it sees x_t on the diffusion
schedule, labels from captions, exports what the pipeline loads) and the guided pipeline (the guidance moves
x̂0 toward the label before thresholding, scale 0 is the unguided sampler, mismatched classifiers are refused)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from t2i_testing import classifier_overrides
from torch import nn

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.conditioning.dropout import CondDropout
from t2i.data.shapes import caption, caption_attributes, random_specs
from t2i.diffusion import classifier_guidance, logp_grad, make_schedule, q_sample, sample_timesteps
from t2i.diffusion.seeded_random import randn
from t2i.exports import ExportError, read_export
from t2i.nn.noisy_classifier import NoisyImageClassifier
from t2i.pipelines.classifier_guidance import ClassifierGuidedPipeline, load_classifier
from t2i.pipelines.sampling import SamplerSettings, denoiser
from t2i.pipelines.text_to_image import TextToImagePipeline
from t2i.stages.noisy_classifier import NoisyClassifierStage, caption_labels

PROMPTS = ["a large red circle in the top left on a white background",
           "a small blue square in the center on a black background"]


@pytest.fixture(scope="module")
def classifier_export(small_shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("noisy_classifier")
    return train(compose_config(classifier_overrides(small_shapes, run, "trainer.fast_dev_run=true"))).export_dir


@pytest.fixture(scope="module")
def base_export(small_shapes, tmp_path_factory):
    """A 16px pixel-space text-to-image export (stage "base": the tiny GLIDE base, its text encoder trained
    jointly, linear schedule T=1000 as the tiny classifier's)."""
    run = tmp_path_factory.mktemp("base")
    overrides = ["experiment=tiny/glide_base", f"run_dir={run}", f"data.train_manifest={small_shapes}/train",
                 f"data.val_manifest={small_shapes}/val", "data.batch_size=4", "data.num_workers=0",
                 "data.min_samples_for_check=100000", "logger=csv", "trainer.limit_val_batches=1",
                 "model.text_encoder.width=32", "model.text_encoder.layers=1", "model.text_encoder.output_dim=32",
                 "model.denoiser.model_channels=8", "model.denoiser.num_head_channels=8", "model.denoiser.num_groups=4",
                 "model.denoiser.context_dim=32", "model.denoiser.vector_dim=32", "model.sample_prompts=[]",
                 "trainer.fast_dev_run=true"]
    return train(compose_config(overrides)).export_dir


# ---- the stage ----------------------------------------------------------------------------------
def test_fast_dev_run_exports_the_classifier(classifier_export):
    export = read_export(classifier_export, stage="classifier")
    assert export.state_dict() and all(k.startswith("classifier.") for k in export.state_dict())
    assert {"val/acc_shape", "val/acc_color", "val/acc_shape_t0", "val/loss"} <= set(export.metrics)
    assert export.metrics["image_size"] == 16 and export.metrics["T"] == 1000
    classifier, labels, ac, size, label_fn = load_classifier(classifier_export)
    assert label_fn is caption_attributes or label_fn.func is caption_attributes  # named by the export's config
    assert labels["shape"] == ["circle", "square", "triangle"] and len(labels["color"]) == 6
    torch.testing.assert_close(ac, make_schedule("linear", 1000))
    logits = classifier(torch.zeros(2, 3, size, size), torch.tensor([0, 999]))
    assert logits["shape"].shape == (2, 3) and logits["color"].shape == (2, 6)


def test_classifier_sees_x_t_and_caption_labels(small_shapes, tmp_path):
    stage = instantiate(compose_config(classifier_overrides(small_shapes, tmp_path)).model)
    specs = random_specs(4, seed=1)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": [caption(s) for s in specs]}
    seen = {}
    forward = stage.classifier.forward

    def spy(x, t):
        seen.update(x=x, t=t)
        return forward(x, t)

    stage.classifier.forward = spy
    loss, _, targets, t = stage._forward(batch, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t_ref = sample_timesteps(4, 1000, generator=g)
    noise = randn((4, 3, 16, 16), generator=g)
    assert torch.equal(seen["t"], t_ref) and torch.equal(t, t_ref)
    torch.testing.assert_close(seen["x"], q_sample(batch["image"], t_ref, noise, stage.alphas_cumprod))
    assert targets["shape"].tolist() == [["circle", "square", "triangle"].index(s.shape) for s in specs]
    assert targets["color"].tolist() == [stage.labels["color"].index(s.color) for s in specs]
    expected = torch.log(torch.tensor(3.0)) + torch.log(torch.tensor(6.0))  # zero-initialised heads: uniform
    torch.testing.assert_close(loss, expected)


def test_labels_come_from_the_label_function():
    labels = {"shape": ["circle", "square", "triangle"]}
    with pytest.raises(ValueError, match="not a canonical shapes caption: 'a photo of a cat'"):
        caption_labels(["a photo of a cat"], labels, caption_attributes)
    with pytest.raises(ValueError, match="triangle.*not among the classifier's classes"):
        caption_labels(["a large red triangle in the top on a white background"], {"shape": ["circle", "square"]},
                       caption_attributes)
    with pytest.raises(ValueError, match="has no hue"):
        caption_labels(["a large red triangle in the top on a white background"], {"hue": ["warm"]},
                       caption_attributes)

    def species(text):  # a dataset of its own: the stage reads whatever labels its function gives
        return {"species": text.split()[-1]}

    got = caption_labels(["a photo of a cat", "a dog"], {"species": ["dog", "cat"]}, species)
    assert got["species"].tolist() == [1, 0]


def test_heads_must_match_labels(small_shapes, tmp_path):
    cfg = compose_config(classifier_overrides(small_shapes, tmp_path, "model.classifier.heads={shape:3,color:5}"))
    with pytest.raises((ValueError, InstantiationException), match="do not match the labels"):
        instantiate(cfg.model)
    with pytest.raises(ValueError, match="repeats a class"):
        NoisyClassifierStage(NoisyImageClassifier(3, 8, {"hue": 2}, channel_mult=[1]), {"hue": ["a", "a"]},
                             optimizer=partial(torch.optim.AdamW), label_fn=caption_attributes)


# ---- guidance on a toy case ---------------------------------------------------------------------
class MeanClassifier(nn.Module):
    """Hand-made p(y | x_t): logits ±k·mean(x_t), classes ["bright", "dark"] of head "size"."""

    in_channels, heads = 3, {"size": 2}

    def forward(self, x, t):
        m = 4.0 * x.mean(dim=(1, 2, 3))
        return {"size": torch.stack([m, -m], dim=1)}


class ZeroX0(nn.Module):
    """A denoiser that always predicts x̂0 = 0 (prediction="x0"), with no conditioning."""

    in_channels = 3

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **cond):
        return torch.zeros_like(x) + 0 * self.anchor


def toy_pipeline(image_size=4):
    ac = make_schedule("linear", 1000)
    net = nn.ModuleDict({"denoiser": ZeroX0(), "cond_dropout": CondDropout({})})
    base = TextToImagePipeline(net, None, None, ac, "x0", image_size)
    return base, ClassifierGuidedPipeline(base, MeanClassifier(), {"size": ["bright", "dark"]}, ac, image_size)


def _x0_fn(pipe, scale, thresholding="none"):
    base = pipe.base
    settings = SamplerSettings(thresholding=thresholding)
    grad = logp_grad(pipe.log_prob_fn([{"size": "bright"}] * 2))
    return denoiser(base.net["denoiser"], base.alphas_cumprod, "x0", pipe._unconditional(2), None, settings,
                    x0_wrapper=lambda f: classifier_guidance(f, grad, scale, base.alphas_cumprod))


def test_guidance_moves_x0_toward_the_label_and_scale_zero_is_unguided():
    base, pipe = toy_pipeline()
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([500, 500])
    plain = denoiser(base.net["denoiser"], base.alphas_cumprod, "x0", pipe._unconditional(2), None,
                     SamplerSettings())(x_t, t)
    torch.testing.assert_close(_x0_fn(pipe, 0.0)(x_t, t), plain)
    guided = _x0_fn(pipe, 2.0)(x_t, t)
    logit = lambda x: pipe.classifier(x, t)["size"][:, 0]
    assert (logit(guided) > logit(plain)).all()
    assert (_x0_fn(pipe, 50.0, "static")(x_t, t) <= 1).all()  # the threshold acts on the guided x̂0
    assert (_x0_fn(pipe, 50.0)(x_t, t) > 1).all()


def test_guided_sampling_follows_the_labels():
    _, pipe = toy_pipeline()
    settings = SamplerSettings(steps=5)
    bright = pipe([{"size": "bright"}, {"size": "dark"}, {}], scale=3.0, settings=settings, seed=0)
    plain = pipe([{"size": "bright"}, {"size": "dark"}, {}], scale=0.0, settings=settings, seed=0)
    means = bright.mean(dim=(1, 2, 3))
    assert means[0] > plain[0].mean() and means[1] < plain[1].mean()
    torch.testing.assert_close(bright[2], plain[2])  # a sample without labels is not guided
    with pytest.raises(ValueError, match="not one of"):
        pipe([{"size": "huge"}], scale=1.0)
    with pytest.raises(ValueError, match="heads"):
        pipe([{"shape": "circle"}], scale=1.0)
    with pytest.raises(ValueError, match="pass captions"):
        pipe([{"size": "bright"}], scale=1.0, conditional=True)


def test_mismatched_classifier_is_refused():
    base, _ = toy_pipeline()
    with pytest.raises(ValueError, match="noise schedule"):
        ClassifierGuidedPipeline(base, MeanClassifier(), {"size": ["a", "b"]}, make_schedule("cosine", 1000), 4)
    with pytest.raises(ValueError, match="noise schedule"):
        ClassifierGuidedPipeline(base, MeanClassifier(), {"size": ["a", "b"]}, make_schedule("linear", 500), 4)
    with pytest.raises(ValueError, match="8px images"):
        ClassifierGuidedPipeline(base, MeanClassifier(), {"size": ["a", "b"]}, make_schedule("linear", 1000), 8)


# ---- the pipeline over exports --------------------------------------------------------------------
def test_pipeline_from_exports_samples_both_modes(base_export, classifier_export):
    pipe = ClassifierGuidedPipeline.from_exports(base_export, classifier_export)
    base = TextToImagePipeline.from_export(base_export, stage="base")
    settings = SamplerSettings(steps=2, guidance_scale=2.0, thresholding="dynamic")
    labels = [{"shape": "circle", "color": "red"}, {"shape": "square"}]
    images = pipe(labels, scale=1.0, settings=settings, seed=0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert pipe(PROMPTS, scale=1.0, settings=settings, seed=0).shape == images.shape  # labels from captions
    # conditional mode at classifier scale 0 is the base pipeline's classifier-free-guided sampler
    torch.testing.assert_close(pipe(PROMPTS, scale=0.0, conditional=True, settings=settings, seed=0),
                               base(PROMPTS, settings, seed=0))
    with pytest.raises(ValueError, match="not a canonical shapes caption"):
        pipe(["a photo of a cat"], scale=1.0)


def test_from_exports_refuses_another_schedule(base_export, classifier_export):
    base = TextToImagePipeline.from_export(base_export, stage="base")
    base.alphas_cumprod = make_schedule("cosine", 1000)
    with pytest.raises(ExportError, match="noise schedule"):
        ClassifierGuidedPipeline.from_exports(base, classifier_export)
    with pytest.raises(ExportError, match="expected a 'base' export"):
        ClassifierGuidedPipeline.from_exports(classifier_export, classifier_export)
