"""CLIP score: the definition (100 * mean of per-pair cosines clipped at 0) and the towers of a CLIP stage export
(equal to the CLIP stage's own embeddings)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t2i.eval.clip_score import ClipEmbedder, ClipScore, clip_cosines, clip_score


def _score_of_cosines(cosines: list[float]) -> float:
    """The CLIP score of images whose cosines to the prompt "red" are `cosines` (see `_FakeEmbedder`)."""
    cos = torch.tensor(cosines)
    images = torch.stack([cos, (1 - cos**2).sqrt(), torch.zeros_like(cos)], dim=1)[:, :, None, None]
    metric = ClipScore(_FakeEmbedder())
    metric.update(images, ["red"] * len(cosines))
    return metric.compute()


def test_clip_score_is_100_times_the_mean_of_cosines_clipped_at_zero():
    assert _score_of_cosines([0.5, -0.2, 1.0]) == pytest.approx(100 * 1.5 / 3)
    assert _score_of_cosines([-0.3, -1.0]) == 0.0
    e = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(clip_cosines(e, e), torch.ones(4))
    torch.testing.assert_close(clip_cosines(3 * e, -e), -torch.ones(4))  # scale-free
    with pytest.raises(ValueError, match="one shape"):
        clip_cosines(e, e[:3])
    with pytest.raises(ValueError, match="at least one"):
        ClipScore(_FakeEmbedder()).compute()


COLOURS = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "anti-red": [-1.0, 0.0, 0.0]}


class _FakeEmbedder:
    """Images embed as their mean colour; a prompt names the colour it embeds as."""

    def images(self, images):
        return F.normalize(images.float().mean((2, 3)), dim=-1)

    def texts(self, prompts):
        return F.normalize(torch.tensor([COLOURS[p] for p in prompts]), dim=-1)


def test_streaming_score_equals_one_shot_and_clips_each_pair():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    images = torch.cat([red, red, red])
    prompts = ["red", "green", "anti-red"]  # cos 1, 0, -1 -> 100 * (1 + 0 + 0) / 3
    metric = ClipScore(_FakeEmbedder())
    cos = metric.update(images[:2], prompts[:2])
    torch.testing.assert_close(cos, torch.tensor([1.0, 0.0]))
    metric.update(images[2:], prompts[2:])
    assert metric.count == 3
    assert metric.compute() == pytest.approx(100 / 3)
    assert clip_score(images, prompts, _embedder_like(_FakeEmbedder()), batch_size=2) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        metric.update(images, prompts[:2])


def _embedder_like(fake) -> ClipEmbedder:
    e = ClipEmbedder.__new__(ClipEmbedder)
    e.images, e.texts = fake.images, fake.texts
    return e


def test_clip_export_towers_equal_the_clip_stage_embeddings(tiny_clip_export, small_shapes, single_thread):
    """ClipEmbedder (frozen towers loaded from the export) gives the embeddings the CLIP stage trained: the full
    open_clip model rebuilt from the export, through the stage's preprocessing and tokenizer."""
    from t2i.conditioning.clip import build_clip, clip_export_spec, clip_preprocess
    from t2i.conditioning.text import OpenClipTokenizer
    from t2i.eval.ldm_report import real_images
    from t2i.exports import read_export

    images, captions = real_images(f"{small_shapes}/val/manifest.json", 32, 12)
    x = images.float() / 127.5 - 1
    embedder = ClipEmbedder.from_clip_export(tiny_clip_export)
    assert embedder.embed_dim == 32

    export = read_export(tiny_clip_export, "clip")
    spec = clip_export_spec(export)
    model = build_clip(spec).eval()
    model.load_state_dict(export.state_dict(), strict=True)
    with torch.no_grad():
        img = model.encode_image(clip_preprocess(x, spec.image_size, spec.mean, spec.std), normalize=True)
        txt = model.encode_text(OpenClipTokenizer(spec.context_length)(captions)[0], normalize=True)
    torch.testing.assert_close(embedder.images(x), img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedder.images(images), img, atol=1e-5, rtol=1e-5)  # uint8 input
    torch.testing.assert_close(embedder.texts(captions), txt, atol=1e-5, rtol=1e-5)

    score = clip_score(x, captions, tiny_clip_export)
    expected = 100 * (img * txt).sum(-1).clamp(min=0).mean()
    assert 0.0 <= score <= 100.0
    assert score == pytest.approx(float(expected), abs=1e-3)
