"""`Cond`: validation, device/dtype moves, batch concatenation and indexing."""

from __future__ import annotations

import pytest
import torch

from t2i.conditioning import Cond
from t2i.diffusion.classifier_free_guidance import classifier_free_guidance


def make(b: int = 4, length: int = 5, dim: int = 8, seed: int = 0) -> Cond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)
    return Cond(context=torch.randn(b, length, dim, generator=g), context_mask=mask,
                vector=torch.randn(b, 3, generator=g), concat=torch.randn(b, 2, 4, 4, generator=g))


def test_batch_size_and_keys():
    c = make(b=3)
    assert c.batch_size == 3
    assert c.set_fields() == ["context", "context_mask", "vector", "concat"]
    assert Cond().batch_size is None and Cond().set_fields() == []
    assert set(c.as_kwargs()) == {"context", "context_mask", "vector", "concat"}


def test_validation_errors():
    with pytest.raises(ValueError, match="batch size"):
        Cond(context=torch.zeros(2, 3, 4), vector=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="without context"):
        Cond(context_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        Cond(context=torch.zeros(2, 3, 4), context_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        Cond(context=torch.zeros(2, 3, 4), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dims"):
        Cond(vector=torch.zeros(2, 3, 4))


def test_to_casts_floats_only():
    c = make().to("cpu", torch.float64)
    assert c.context.dtype == c.vector.dtype == c.concat.dtype == torch.float64
    assert c.context_mask.dtype == torch.bool


def test_cat_and_index_roundtrip():
    a, b = make(b=2, seed=1), make(b=3, seed=2)
    c = Cond.cat([a, b])
    assert c.batch_size == 5
    for name in ("context", "context_mask", "vector", "concat"):
        torch.testing.assert_close(getattr(c[:2], name), getattr(a, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(c.index(torch.tensor([2, 3, 4])), name), getattr(b, name),
                                   rtol=0, atol=0)
    one = c.index(3)
    assert one.batch_size == 1 and torch.equal(one.vector, b.vector[1:2])
    assert torch.equal(c[-1].vector, b.vector[-1:])
    sel = c[torch.tensor([True, False, False, False, True])]
    assert torch.equal(sel.vector, torch.cat([a.vector[:1], b.vector[-1:]]))
    assert c.repeat_interleave(2).batch_size == 10


def test_cat_pads_contexts_of_different_length():
    a = Cond(context=torch.randn(2, 3, 4))  # no mask: all tokens real
    full = make(b=1, length=5, dim=4)
    b = Cond(context=full.context, context_mask=full.context_mask)
    c = Cond.cat([a, b])
    assert c.context.shape == (3, 5, 4)
    assert c.context_mask[:2].tolist() == [[True] * 3 + [False] * 2] * 2
    assert torch.equal(c.context_mask[2], b.context_mask[0])
    assert torch.equal(c.context[:2, 3:], torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="different fields"):
        Cond.cat([Cond(vector=torch.zeros(1, 2)), a])


def test_usable_with_unet_kwargs_and_guidance():
    """The existing CFG helper concatenates a dataclass field by field: Cond works with it."""
    seen = {}

    def model_fn(x, t, cond: Cond):
        seen["b"] = cond.batch_size
        return x * cond.vector.mean(dim=1, keepdim=True)[:, :, None, None]

    c = Cond(vector=torch.ones(2, 3))
    u = Cond(vector=torch.zeros(2, 3))
    out = classifier_free_guidance(model_fn, 3.0)(torch.ones(2, 1, 2, 2), torch.zeros(2), c, u)
    assert seen["b"] == 4 and torch.allclose(out, torch.full_like(out, 3.0))
