"""The unCLIP prior transformer: token layout, causal + padding mask, x0 output at the query position."""

from __future__ import annotations

import pytest
import torch

from t2i.nn.prior import NUM_TRAILING, PriorTransformer, prior_attention_mask


@pytest.fixture
def prior(single_thread):
    torch.manual_seed(0)
    return PriorTransformer(embed_dim=8, text_width=12, width=16, layers=2, heads=2, max_text_tokens=6).eval()


def _inputs(b=3, length=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 8, generator=g)
    ctx = torch.randn(b, length, 12, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] * 1 + [False] * 5])[:b]
    vec = torch.randn(b, 8, generator=g)
    t = torch.tensor([10, 500, 999])[:b]
    return x, t, ctx, mask, vec


def test_token_layout(prior):
    x, t, ctx, _, vec = _inputs()
    tokens = prior.tokens(x, t, ctx, vec)
    assert tokens.shape == (3, 6 + NUM_TRAILING, 16)
    torch.testing.assert_close(tokens[:, :6], prior.text_proj(ctx))
    torch.testing.assert_close(tokens[:, 6], prior.text_embed_proj(vec))
    from t2i.nn.embeddings import timestep_embedding
    torch.testing.assert_close(tokens[:, 7], prior.time_embed(timestep_embedding(t, 16)))
    torch.testing.assert_close(tokens[:, 8], prior.x_proj(x))
    torch.testing.assert_close(tokens[:, 9], prior.query.expand(3, -1))


def test_attention_mask_is_causal_and_skips_padding():
    mask = prior_attention_mask(torch.tensor([[True, True, False]]))[0]
    s = 3 + NUM_TRAILING
    assert mask.shape == (s, s)
    for i in range(s):
        for j in range(s):
            expected = (j <= i and j != 2) or i == j  # padded key 2 only attends to itself
            assert bool(mask[i, j]) == expected, (i, j)


def test_output_reads_the_query_and_ignores_padding(prior):
    x, t, ctx, mask, vec = _inputs()
    out = prior(x, t, ctx, mask, vec)
    assert out.shape == (3, 8)
    ctx2 = ctx.clone()
    ctx2[~mask] = 100.0  # padded token states must not matter
    torch.testing.assert_close(prior(x, t, ctx2, mask, vec), out)
    ctx3 = ctx.clone()
    ctx3[0, 0] += 1.0  # a real token does
    assert not torch.allclose(prior(x, t, ctx3, mask, vec)[0], out[0])
    assert not torch.allclose(prior(x + 1, t, ctx, mask, vec), out)
    assert not torch.allclose(prior(x, t, ctx, mask, vec + 1), out)
    assert not torch.allclose(prior(x, t + 1, ctx, mask, vec), out)


def test_earlier_positions_do_not_see_later_ones(prior):
    """Causality: the hidden states of the text tokens do not depend on the noised embedding after them."""
    x, t, ctx, mask, vec = _inputs()
    states = []
    hook = prior.blocks[-1].register_forward_hook(lambda _m, _i, out: states.append(out))
    prior(x, t, ctx, mask, vec)
    prior(x + 5.0, t, ctx, mask, vec)
    hook.remove()
    a, b = states
    torch.testing.assert_close(a[:, :8], b[:, :8])  # text tokens, text embedding, timestep
    assert not torch.allclose(a[:, 8:], b[:, 8:])  # noised embedding and query


def test_bad_inputs_are_refused(prior):
    x, t, ctx, mask, vec = _inputs()
    with pytest.raises(ValueError, match="text token states"):
        prior(x, t, None, None, vec)
    with pytest.raises(ValueError, match="text embedding"):
        prior(x, t, ctx, mask, None)
    with pytest.raises(ValueError, match="max_text_tokens"):
        prior(x, t, torch.randn(3, 7, 12), None, vec)
    with pytest.raises(ValueError, match="image embeddings"):
        prior(torch.randn(3, 9), t, ctx, mask, vec)


def test_trimming_padding_changes_nothing(prior):
    """The trailing tokens sit at fixed positions, so cutting the padded tail of the text is exact."""
    x, t, ctx, _, vec = _inputs()
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 2 + [False] * 4, [True] + [False] * 5])
    torch.testing.assert_close(prior(x, t, ctx[:, :3], mask[:, :3], vec), prior(x, t, ctx, mask, vec))
