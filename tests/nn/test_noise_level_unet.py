"""The super-resolution UNet wrapper: degradation levels and (optionally) pooled text into the embedding."""

import pytest
import torch

from t2i.nn.noise_level_unet import NoiseLevelUNet, masked_mean
from t2i.nn.unet import UNet


def unet(context_dim=None, **kw):
    return UNet(in_channels=3, out_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,) if context_dim else (), num_head_channels=8, context_dim=context_dim,
                vector_dim=16, concat_channels=3, num_groups=4, **kw)


def test_masked_mean_ignores_padding():
    ctx = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = masked_mean(ctx, mask)
    torch.testing.assert_close(out[0], ctx[0, :2].mean(0))
    torch.testing.assert_close(out[1], ctx[1].mean(0))
    torch.testing.assert_close(masked_mean(ctx, None), ctx.mean(1))


def test_pooled_text_changes_the_embedding_and_padding_does_not():
    torch.manual_seed(0)
    net = NoiseLevelUNet(unet(context_dim=8, self_attention=False), num_levels=2, pool_context=True)
    seen = []
    net.unet.register_forward_hook(lambda m, a, kw, out: seen.append(kw["vector"].clone()), with_kwargs=True)
    x, low, levels = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.tensor([[0.2, 0.0], [0.2, 0.0]])
    ctx = torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    net(x, torch.tensor([10, 10]), context=ctx, context_mask=mask, vector=levels, concat=low)
    padded = torch.cat([ctx, torch.randn(2, 2, 8)], 1)
    net(x, torch.tensor([10, 10]), context=padded, context_mask=torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], 1),
        vector=levels, concat=low)
    torch.testing.assert_close(seen[0], seen[1])
    assert not torch.allclose(seen[0][0], seen[0][1])  # same levels, different captions
    assert seen[0].shape == (2, 16)


def test_pool_context_needs_cross_attention():
    with pytest.raises(ValueError, match="pool_context"):
        NoiseLevelUNet(unet(), num_levels=2, pool_context=True)
