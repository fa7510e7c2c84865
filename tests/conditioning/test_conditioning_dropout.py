"""`CondDropout`: per-sample, per-key classifier-free-guidance dropout with zero / learned / fixed nulls."""

from __future__ import annotations

import pytest
import torch

from t2i.conditioning import Cond, CondDropout

B, L, D, DV = 64, 6, 8, 5


def make_cond() -> Cond:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (B, 1), generator=g)
    return Cond(context=torch.randn(B, L, D, generator=g) + 3, context_mask=mask,
                vector=torch.randn(B, DV, generator=g) + 3, concat=torch.randn(B, 3, 4, 4, generator=g))


def learned(**kw) -> CondDropout:
    return CondDropout(kw.pop("p", {"context": 0.5, "vector": 0.5}), {"context": "learned", "vector": "learned"},
                       context_dim=D, vector_dim=DV, null_context_length=2, **kw)


def test_p0_keeps_everything():
    c = make_cond()
    out = learned(p={"context": 0.0, "vector": 0.0}).train()(c, torch.Generator().manual_seed(1))
    for name in c.set_fields():
        assert torch.equal(getattr(out, name), getattr(c, name))


def test_p1_replaces_everything_with_the_null():
    c = make_cond()
    drop = learned(p={"context": 1.0, "vector": 1.0}).train()
    out = drop(c, torch.Generator().manual_seed(1))
    assert torch.equal(out.vector, drop.null_vector.expand(B, DV))
    assert torch.equal(out.context[:, :2], drop.null_context.expand(B, 2, D))
    assert torch.equal(out.context[:, 2:], torch.zeros(B, L - 2, D))
    assert out.context_mask.tolist() == [[True, True] + [False] * (L - 2)] * B
    assert torch.equal(out.concat, c.concat)  # keys without a probability are kept
    zero = CondDropout({"context": 1.0, "vector": 1.0, "concat": 1.0}).train()(c)
    assert not zero.context.any() and not zero.vector.any() and not zero.concat.any()
    assert zero.context_mask.all()  # a zero null hides the caption's length too


def test_p_half_drops_about_half_per_sample_deterministically():
    c = make_cond()
    drop = learned().train()
    out = drop(c, torch.Generator().manual_seed(123))
    dropped = (out.vector == drop.null_vector).all(dim=1)
    assert 20 <= int(dropped.sum()) <= 44
    # joint (default): the caption's tokens and pooled vector are dropped for the same samples
    ctx_dropped = (out.context[:, :2] == drop.null_context).all(dim=(1, 2))
    assert torch.equal(dropped, ctx_dropped)
    # per sample: kept samples are untouched
    assert torch.equal(out.vector[~dropped], c.vector[~dropped])
    assert torch.equal(out.context_mask[~dropped], c.context_mask[~dropped])
    again = drop(c, torch.Generator().manual_seed(123))
    assert torch.equal(again.vector, out.vector)
    independent = learned(joint=False).train()(c, torch.Generator().manual_seed(123))
    ind_vec = (independent.vector != c.vector).any(1)
    ind_ctx = (independent.context != c.context).any(dim=(1, 2))
    assert not torch.equal(ind_vec, ind_ctx)


def test_force_and_eval_mode():
    c = make_cond()
    drop = learned(p={"context": 1.0, "vector": 1.0})
    assert drop.eval()(c) is c  # no dropout in eval mode unless forced
    assert torch.equal(drop(c, force=False).vector, c.vector)
    which = torch.zeros(B, dtype=torch.bool)
    which[[0, 5]] = True
    out = drop(c, force=which)
    changed = (out.vector != c.vector).any(1)
    assert torch.equal(changed, which)
    uncond = drop.null_like(c)
    assert torch.equal(uncond.vector, drop.null_vector.expand(B, DV))
    both = Cond.cat([c, uncond])
    assert both.batch_size == 2 * B


def test_learned_null_receives_gradients():
    c = make_cond()
    drop = learned().train()
    out = drop(c, torch.Generator().manual_seed(0))
    (out.context.sum() + out.vector.sum()).backward()
    assert drop.null_vector.grad is not None and drop.null_vector.grad.abs().sum() > 0
    assert drop.null_context.grad is not None and drop.null_context.grad.abs().sum() > 0


def test_fixed_null_like_an_empty_caption():
    c = make_cond()
    null_ctx = torch.randn(L, D)
    null_mask = torch.tensor([True, True] + [False] * (L - 2))
    drop = CondDropout({"context": 1.0}, {"context": null_ctx}, null_context_mask=null_mask).train()
    out = drop(c)
    assert torch.equal(out.context, null_ctx.expand(B, L, D))
    assert torch.equal(out.context_mask, null_mask.expand(B, L))
    assert "null_context" in drop.state_dict()


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown"):
        CondDropout({"text": 0.1})
    with pytest.raises(ValueError, match="vector_dim"):
        CondDropout({"vector": 0.1}, {"vector": "learned"})
    with pytest.raises(ValueError, match="concat"):
        CondDropout({"concat": 0.1}, {"concat": "learned"})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CondDropout({"vector": 1.5})
    too_long = CondDropout({"context": 1.0}, {"context": "learned"}, context_dim=D, null_context_length=L + 1)
    with pytest.raises(ValueError, match="more than"):
        too_long(make_cond(), force=True)
