"""OpenCLIP tokenizer and text encoders (tiny configs; nothing downloaded)."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch

from t2i.conditioning import OpenClipTextEncoder, OpenClipTokenizer

SOT, EOT = 49406, 49407
CAPTION = "a large red circle in the top left on a white background"
TINY_ARCH = "t2i-test-tiny-clip"


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids_and_mask():
    tok = OpenClipTokenizer(context_length=32)
    ids, mask = tok([CAPTION, ""])
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long and mask.dtype == torch.bool
    n = int(mask[0].sum())
    assert n == 14  # SOT + 12 BPE tokens + EOT
    assert ids[0, 0] == SOT and ids[0, n - 1] == EOT and (ids[0, n:] == 0).all()
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert ids[0, :n].tolist() == [SOT, 320, 3638, 736, 7117, 530, 518, 1253, 1823, 525, 320, 1579, 5994, EOT]
    assert ids[1, :2].tolist() == [SOT, EOT] and mask[1].sum() == 2
    assert torch.equal(ids, open_clip.tokenize([CAPTION, ""], context_length=32))  # same as open_clip


def test_tokenizer_truncates_keeping_eot():
    tok = OpenClipTokenizer(context_length=8)
    ids, mask = tok("one two three four five six seven eight nine ten")
    assert ids.shape == (1, 8) and mask.all()
    assert ids[0, 0] == SOT and ids[0, -1] == EOT
    assert tok.decode(ids) == ["one two three four five six"]
    with pytest.raises(ValueError):
        OpenClipTokenizer(context_length=1)


def test_tokenizer_survives_deepcopy():
    tok = copy.deepcopy(OpenClipTokenizer(context_length=16))
    assert tok("hi")[0].shape == (1, 16)


# ---------------------------------------------------------------------------------------------- trainable
@pytest.fixture(scope="module")
def tiny() -> OpenClipTextEncoder:
    torch.manual_seed(0)
    return OpenClipTextEncoder.from_config(width=128, layers=2, heads=4, context_length=32, output_dim=128)


def test_tiny_encoder_shapes_and_open_clip_equivalence(tiny):
    assert tiny.width == 128 and tiny.pooled_dim == 128 and not tiny.frozen
    enc = tiny([CAPTION, "a small blue square in the center on a black background", ""])
    assert enc.context.shape == (3, 32, 128) and enc.mask.shape == (3, 32) and enc.pooled.shape == (3, 128)
    assert enc.mask.sum(-1).tolist()[2] == 2
    ids, _ = tiny.tokenize([CAPTION])
    # pooled and context equal open_clip's own TextTransformer forward
    tiny.tower.output_tokens = True
    try:
        pooled, tokens = tiny.tower(ids)
    finally:
        tiny.tower.output_tokens = False
    torch.testing.assert_close(tiny(ids).pooled, pooled)
    torch.testing.assert_close(tiny(ids).context, tokens)


def test_tiny_encoder_gradients_and_caption_sensitivity(tiny):
    tiny.zero_grad()
    a = tiny(["a large red circle in the top left on a white background"])
    b = tiny(["a large red circle in the top left on a black background"])
    assert not torch.allclose(a.context, b.context) and not torch.allclose(a.pooled, b.pooled)
    # causal: the shared prefix (SOT + 10 tokens) has identical states
    torch.testing.assert_close(a.context[:, :11], b.context[:, :11])
    (a.context.square().mean() + a.pooled.square().mean()).backward()
    grads = {n: p.grad for n, p in tiny.named_parameters()}
    assert all(p.requires_grad for p in tiny.parameters())
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]


def test_penultimate_layer_matches_open_clip_intermediates(tiny):
    pen = OpenClipTextEncoder(tower=tiny.tower, layer="penultimate")
    raw = OpenClipTextEncoder(tower=tiny.tower, layer="penultimate", penultimate_ln=False)
    ids, _ = tiny.tokenize([CAPTION])
    inter = tiny.tower.forward_intermediates(ids, indices=[0], intermediates_only=True,
                                              output_fmt="NLC")["text_intermediates"][0]
    torch.testing.assert_close(raw(ids).context, inter)
    torch.testing.assert_close(pen(ids).context, tiny.tower.ln_final(inter))
    torch.testing.assert_close(pen(ids).pooled, tiny(ids).pooled)  # pooled always from the last layer


def test_vocab_smaller_than_tokenizer_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        OpenClipTextEncoder.from_config(width=32, layers=1, heads=2, vocab_size=1000)


# ---------------------------------------------------------------------------------------------- pretrained
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A registered tiny CLIP config (quick_gelu as OpenAI's weights) and its random state dict on disk."""
    folder = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3}}
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH, pretrained=None).eval()
    path = folder / "clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_pretrained_pooled_equals_encode_text(tiny_clip, tmp_path):
    model, path = tiny_clip
    wrapped = tmp_path / "wrapped.pt"  # open_clip training checkpoints keep weights under "state_dict"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    from safetensors.torch import save_file

    st = tmp_path / "clip.safetensors"
    save_file(model.state_dict(), str(st))
    texts = [CAPTION, "hello world", ""]
    for ckpt in (path, wrapped, st):
        enc = OpenClipTextEncoder(TINY_ARCH, ckpt)
        ids, _ = enc.tokenize(texts)
        out = enc(texts)
        assert out.context.shape == (3, 77, 48) and enc.pooled_dim == 32
        torch.testing.assert_close(out.pooled, model.encode_text(ids), rtol=1e-5, atol=1e-5)
    # bit-identical to a frozen eval reference (both then take torch's MultiheadAttention fast path)
    frozen_ref = copy.deepcopy(model).requires_grad_(False)
    assert torch.equal(enc(ids).pooled, frozen_ref.encode_text(ids))
    # causal: a shorter context length leaves the kept tokens' states unchanged
    short = OpenClipTextEncoder(TINY_ARCH, path, context_length=16)
    torch.testing.assert_close(short(texts).context, out.context[:, :16])
    torch.testing.assert_close(short(texts).pooled, out.pooled)


def test_pretrained_is_frozen_forever(tiny_clip):
    _, path = tiny_clip
    enc = OpenClipTextEncoder(TINY_ARCH, path, layer="penultimate")
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.tower.training and not any(m.training for m in enc.tower.modules())
    out = enc(["a red circle"])
    assert not out.context.requires_grad and not out.pooled.requires_grad
    assert not hasattr(enc.tower, "visual") and not any("visual" in k for k in enc.state_dict())
    assert enc.tower.attn_mask is not None  # causal mask kept


def test_pretrained_missing_key_is_named(tiny_clip, tmp_path):
    model, _ = tiny_clip
    sd = model.state_dict()
    del sd["ln_final.weight"]
    sd["text_extra.weight"] = torch.zeros(1)
    bad = tmp_path / "missing.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"missing keys \['ln_final.weight'\].*text_extra.weight"):
        OpenClipTextEncoder(TINY_ARCH, bad)


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    bad = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": NotATensor()}}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        OpenClipTextEncoder(TINY_ARCH, bad)


def test_bad_arguments(tiny_clip):
    _, path = tiny_clip
    with pytest.raises(ValueError, match="from_config"):
        OpenClipTextEncoder("ViT-B-32")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenClipTextEncoder("no-such-model", path)
    with pytest.raises(ValueError, match="layer"):
        OpenClipTextEncoder(TINY_ARCH, path, layer="first")
    with pytest.raises(FileNotFoundError):
        OpenClipTextEncoder(TINY_ARCH, path.with_name("nope.pt"))


def test_hub_model_names_are_refused(tmp_path):
    """A name that would make open_clip fetch a config over the network is an error, never a download."""
    with pytest.raises(ValueError, match="hf-hub"):
        OpenClipTextEncoder("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", tmp_path / "none.bin")


def test_stable_diffusion_padding_options():
    """SD's conditioning: all 77 states attended (padding included), SD 1.x pads with end-of-text."""
    torch.manual_seed(0)
    plain = OpenClipTextEncoder.from_config(width=32, layers=1, heads=2, context_length=12, output_dim=None)
    sd1 = OpenClipTextEncoder(tower=plain.tower, attend_to_padding=True, pad_with_eot=True)
    ids, mask = plain.tokenize(["a red circle"])
    out = sd1(["a red circle"])
    assert out.mask.all() and not mask.all()
    eot_padded = torch.where(mask, ids, torch.full_like(ids, plain.tokenizer.eot_id))
    with torch.no_grad():
        expected, _ = plain._encode(eot_padded)
    torch.testing.assert_close(out.context, expected)
    kept = mask[0]
    torch.testing.assert_close(out.context[0, kept], plain(["a red circle"]).context[0, kept])  # causal: same
    torch.testing.assert_close(out.pooled, plain(["a red circle"]).pooled)  # pooled at the first EOT
