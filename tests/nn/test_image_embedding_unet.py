"""The unCLIP decoder network's conditioning paths: the image embedding reaches the timestep embedding and
4 context tokens, the text tokens sit beside them, and each can be dropped on its own for CFG."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.conditioning.cond import Cond
from t2i.conditioning.dropout import CondDropout
from t2i.nn.image_embedding_unet import ImageEmbeddingUNet
from t2i.nn.unet import UNet


@pytest.fixture
def decoder(single_thread):
    torch.manual_seed(0)
    unet = UNet(3, 3, 16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_head_channels=8,
                context_dim=24, vector_dim=10, num_groups=4)
    net = ImageEmbeddingUNet(unet, embed_dim=10, text_width=12, num_image_tokens=4).eval()
    for p in net.parameters():  # the UNet's zero-initialised output would hide every dependency
        torch.nn.init.normal_(p, std=0.1)
    return net


def _inputs(b=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 3, 8, 8, generator=g)
    embed = torch.nn.functional.normalize(torch.randn(b, 10, generator=g), dim=-1)
    text = torch.randn(b, 5, 12, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:b]
    return x, torch.tensor([3, 700])[:b], embed, text, mask


def test_embedding_goes_to_time_embedding_and_four_tokens(decoder):
    x, t, embed, text, mask = _inputs()
    seen = {}
    hook = decoder.unet.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    decoder(x, t, context=text, context_mask=mask, vector=embed)
    hook.remove()
    scaled = embed * math.sqrt(10)
    torch.testing.assert_close(seen["vector"], scaled)
    ctx, ctx_mask = seen["context"], seen["context_mask"]
    assert ctx.shape == (2, 4 + 5, 24)
    torch.testing.assert_close(ctx[:, :4], decoder.image_tokens(scaled).reshape(2, 4, 24))
    torch.testing.assert_close(ctx[:, 4:], decoder.text_proj(text))
    assert ctx_mask[:, :4].all() and torch.equal(ctx_mask[:, 4:], mask)


def test_output_depends_on_embedding_and_text(decoder):
    x, t, embed, text, mask = _inputs()
    out = decoder(x, t, context=text, context_mask=mask, vector=embed)
    assert not torch.allclose(decoder(x, t, context=text, context_mask=mask, vector=embed.flip(0)), out)
    assert not torch.allclose(decoder(x, t, context=text + 1, context_mask=mask, vector=embed), out)
    padded = text.clone()
    padded[~mask] = 50.0
    torch.testing.assert_close(decoder(x, t, context=padded, context_mask=mask, vector=embed), out)


def test_text_and_image_are_dropped_independently(decoder):
    """CondDropout(joint=False): dropping the text keeps the image embedding and vice versa."""
    _, _, embed, text, mask = _inputs()
    drop = CondDropout({"context": 0.5, "vector": 0.1}, {"context": "learned", "vector": "learned"},
                       context_dim=12, vector_dim=10, joint=False)
    cond = Cond(context=text, context_mask=mask, vector=embed)
    force_rows = torch.tensor([True, False])
    masks = drop.drop_masks(2, force=None, generator=torch.Generator().manual_seed(0))
    assert set(masks) == {"context", "vector"}
    # drop only the text of sample 0
    text_only = drop._drop_context(cond, force_rows, "learned")
    assert torch.equal(text_only["context"][1], text[1])
    assert torch.equal(text_only["context"][0, 0], drop.null_context[0].detach())
    # statistics of independent draws: both, either and neither occur
    drop.train()
    g = torch.Generator().manual_seed(0)
    m = drop.drop_masks(20_000, generator=g)
    both = (m["context"] & m["vector"]).float().mean().item()
    assert abs(m["context"].float().mean().item() - 0.5) < 0.02
    assert abs(m["vector"].float().mean().item() - 0.1) < 0.01
    assert abs(both - 0.05) < 0.01  # independent: 0.5 x 0.1


def test_decoder_without_text(single_thread):
    unet = UNet(3, 3, 16, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_head_channels=8,
                context_dim=16, vector_dim=6, num_groups=4)
    net = ImageEmbeddingUNet(unet, embed_dim=6, text_width=None)
    x = torch.randn(2, 3, 4, 4)
    assert net(x, 5, vector=torch.randn(2, 6)).shape == x.shape
    with pytest.raises(ValueError, match="takes no text"):
        net(x, 5, context=torch.randn(2, 3, 16), vector=torch.randn(2, 6))
    with pytest.raises(ValueError, match="image embedding"):
        net(x, 5)


def test_mismatched_widths_are_refused():
    unet = UNet(3, 3, 16, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_head_channels=8,
                context_dim=16, vector_dim=6, num_groups=4)
    with pytest.raises(ValueError, match="vector_dim"):
        ImageEmbeddingUNet(unet, embed_dim=7)


def test_coordinate_channels_reach_the_unet(single_thread):
    from t2i.nn.image_embedding_unet import coordinate_grid
    unet = UNet(3, 3, 16, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_head_channels=8,
                context_dim=16, vector_dim=6, concat_channels=2, num_groups=4)
    net = ImageEmbeddingUNet(unet, embed_dim=6, coordinate_channels=True)
    seen = {}
    hook = unet.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    net(torch.randn(2, 3, 4, 4), 5, vector=torch.randn(2, 6))
    hook.remove()
    grid = seen["concat"]
    assert grid.shape == (2, 2, 4, 4)
    torch.testing.assert_close(grid[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # y down the rows
    torch.testing.assert_close(grid[0, 1, 0, :], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x along a row
    torch.testing.assert_close(coordinate_grid(torch.zeros(1, 3, 4, 4)), grid[:1])
    with pytest.raises(ValueError, match="concat_channels"):
        ImageEmbeddingUNet(unet, embed_dim=6, coordinate_channels=False)
