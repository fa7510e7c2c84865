"""Frozen CLIP encoders from a CLIP stage export equal open_clip's own encode_image / encode_text, with
open_clip's preprocessing; building CLIP models from names or dicts never downloads."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from t2i.conditioning.clip import (
    ClipImageEncoder,
    build_clip,
    clip_export_model_config,
    clip_export_spec,
    clip_preprocess,
    clip_spec,
)
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.exports import read_export

CAPTIONS = ["a large red circle in the top left on a white background",
            "a small blue square in the center on a black background", ""]


@pytest.fixture(scope="module")
def reference(tiny_clip_export) -> open_clip.model.CLIP:
    """open_clip's own model, built from the export's config and loaded with its weights, frozen in eval
    mode (so that, like the frozen encoders, it takes torch's MultiheadAttention fast path)."""
    model = open_clip.model.CLIP(**clip_export_model_config(tiny_clip_export))
    model.load_state_dict(read_export(tiny_clip_export).state_dict(), strict=True)
    return model.eval().requires_grad_(False)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_text_encoder_from_export_equals_encode_text(tiny_clip_export, reference):
    enc = OpenClipTextEncoder.from_clip_export(tiny_clip_export)
    ids = open_clip.tokenize(CAPTIONS, context_length=enc.context_length)
    out = enc(CAPTIONS)
    assert torch.equal(out.pooled, reference.encode_text(ids))
    assert out.context.shape == (3, 24, 32) and enc.pooled_dim == 32
    assert out.mask.sum(-1).tolist()[2] == 2
    # frozen forever: no grad, eval even after .train()
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.tower.training and not out.pooled.requires_grad
    short = OpenClipTextEncoder.from_clip_export(tiny_clip_export, context_length=16)  # causal: a prefix
    torch.testing.assert_close(short(CAPTIONS).context, out.context[:, :16], atol=1e-5, rtol=1e-5)


def test_image_encoder_from_export_equals_encode_image_with_open_clip_preprocessing(tiny_clip_export, reference):
    enc = ClipImageEncoder.from_clip_export(tiny_clip_export)
    assert enc.embed_dim == 32 and enc.image_size == (32, 32)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.visual.training
    pixels = _images(4, 32)
    # open_clip's eval transform on PIL images (no resize at the tower's size): ToTensor + Normalize
    transform = open_clip.image_transform(32, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    expected = reference.encode_image(torch.stack([transform(im) for im in pil]))
    got = enc(pixels.float() / 127.5 - 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    normed = enc.embed(pixels.float() / 127.5 - 1, normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(normed, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


def test_image_encoder_resizes_like_open_clip(tiny_clip_export, reference):
    """64px inputs: our bicubic antialiased tensor resize vs open_clip's PIL bicubic resize."""
    enc = ClipImageEncoder.from_clip_export(tiny_clip_export, normalize=True)
    big = torch.nn.functional.interpolate(_images(4, 16, seed=1).float(), size=64, mode="nearest")
    big = big.to(torch.uint8)  # blocky images: resizing them back is nearly lossless either way
    transform = open_clip.image_transform(32, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in big]
    expected = torch.nn.functional.normalize(reference.encode_image(torch.stack([transform(im) for im in pil])),
                                             dim=-1)
    got = enc(big.float() / 127.5 - 1)
    assert (got * expected).sum(-1).min() > 0.999
    x = clip_preprocess(big.float() / 127.5 - 1, (32, 32), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_image_encoder_from_checkpoint_file_and_strict_keys(tiny_clip_export, reference, tmp_path):
    spec = clip_export_spec(tiny_clip_export)
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    enc = ClipImageEncoder.from_checkpoint(path, config=spec.model_config)
    x = _images(2, 32).float() / 127.5 - 1
    torch.testing.assert_close(enc(x), ClipImageEncoder.from_clip_export(tiny_clip_export)(x), atol=0, rtol=0)
    sd = dict(reference.state_dict())
    sd.pop("visual.proj")
    sd["visual.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['proj'\], unexpected keys \['extra'\]"):
        ClipImageEncoder.from_state_dict(sd, spec)


def test_clip_spec_named_custom_and_errors():
    spec = clip_spec("ViT-B-32")
    assert spec.embed_dim == 512 and spec.image_size == (224, 224) and spec.context_length == 77
    assert spec.mean == tuple(OPENAI_DATASET_MEAN)
    with torch.device("meta"):  # the real size builds (no memory, no time, no download)
        model = build_clip(spec)
    assert model.visual.output_dim == 512
    custom = clip_spec(config={"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32,
                                                                "layers": 1, "head_width": 16},
                               "text_cfg": {"context_length": 8, "width": 32, "heads": 2, "layers": 1}},
                       image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert custom.mean == (0.5, 0.5, 0.5) and build_clip(custom).encode_image(torch.zeros(1, 3, 16, 16)).shape == (1, 16)
    with pytest.raises(ValueError, match="exactly one"):
        clip_spec()
    with pytest.raises(ValueError, match="unknown open_clip model"):
        clip_spec("hf-hub:someone/some-model")  # never fetched
    with pytest.raises(ValueError, match="widht"):
        clip_spec(config={"embed_dim": 16, "vision_cfg": {"widht": 3}, "text_cfg": {}})
    with pytest.raises(ValueError, match="not supported"):
        clip_spec("coca_ViT-B-32")
    assert np.isclose(sum(custom.std), 1.5)
