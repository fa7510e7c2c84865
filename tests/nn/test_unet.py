import math

import pytest
import torch

from t2i.nn.attention import CrossAttention, SpatialTransformer
from t2i.nn.embeddings import TimestepEmbedding, timestep_embedding
from t2i.nn.unet import UNet

TINY = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_levels": (0, 1), "num_heads": 4, "context_dim": 16}


pytestmark = pytest.mark.usefixtures("single_thread")


def randomize_zero_params(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised layers (out conv, proj_out, res-block out convs) make the UNet trivial at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def make(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return randomize_zero_params(UNet(**{**TINY, **overrides}), seed=seed)


def inputs(batch: int = 2, size: int = 8, tokens: int = 5, context_dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, tokens, context_dim, generator=g)
    return x, t, context


# --- embeddings ---------------------------------------------------------------------------------------

def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 1.5, 999.0]), 32)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb[0, :16], torch.ones(16)) and torch.allclose(emb[0, 16:], torch.zeros(16))
    assert torch.allclose(emb[1, 0], torch.tensor(math.cos(1.5)))  # cos first, frequency 1
    flipped = timestep_embedding(torch.tensor([1.5]), 32, flip_sin_to_cos=False)
    assert torch.allclose(flipped[0, :16], emb[1, 16:])
    odd = timestep_embedding(torch.tensor(7), 33)  # scalar t, odd dim zero padded
    assert odd.shape == (1, 33) and odd[0, -1] == 0
    mlp = TimestepEmbedding(32, 128)
    assert [n for n, _ in mlp.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert mlp(emb).shape == (3, 128)


# --- attention ----------------------------------------------------------------------------------------

def test_cross_attention_mask_equals_truncated_context():
    torch.manual_seed(0)
    attn = CrossAttention(32, context_dim=16, heads=4, dim_head=8)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = attn(x, ctx, mask)
    assert torch.allclose(out[0], attn(x[:1], ctx[:1, :4])[0], atol=1e-5)
    assert torch.allclose(out[1], attn(x[1:], ctx[1:])[0], atol=1e-5)
    assert attn(x, ctx, torch.zeros(2, 6, dtype=torch.bool)).isfinite().all()  # fully masked: no NaN
    assert CrossAttention(32, heads=4, dim_head=8)(x).shape == x.shape  # self-attention


def test_spatial_transformer_projections():
    conv = SpatialTransformer(32, 4, 8, context_dim=16)
    lin = SpatialTransformer(32, 4, 8, context_dim=16, use_linear_projection=True)
    assert conv.proj_in.weight.shape == (32, 32, 1, 1) and lin.proj_in.weight.shape == (32, 32)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 16)
    assert torch.equal(conv(x, ctx), x) and torch.equal(lin(x, ctx), x)  # zero-initialised proj_out
    no_cross = SpatialTransformer(32, 4, 8)
    assert not hasattr(no_cross.transformer_blocks[0], "attn2") and no_cross(x).shape == x.shape


# --- UNet ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,kwargs", [
    ({}, {}),
    ({"context_dim": None}, {"context": None}),
    ({"vector_dim": 12}, {"vector": True}),
    ({"concat_channels": 3}, {"concat": True}),
    ({}, {"mask": True}),
    ({"efficient": True, "num_res_blocks": (1, 2)}, {}),
    ({"resblock_updown": True, "use_scale_shift_norm": True, "num_heads": 8}, {}),
    ({"use_linear_projection": True, "num_heads": -1, "num_head_channels": 8, "transformer_depth": 2}, {}),
    ({"channel_mult": (1, 2, 2), "attention_levels": (1,), "out_channels": 8, "dropout": 0.1}, {}),
])
def test_output_shapes(overrides, kwargs):
    model = make(**overrides)
    x, t, context = inputs(tokens=7)
    call = {"context": context}
    if kwargs.get("context", True) is None:
        call = {}
    if kwargs.get("vector"):
        call["vector"] = torch.randn(2, 12)
    if kwargs.get("concat"):
        call["concat"] = torch.randn(2, 3, 4, 4)  # low-res image: resized to x's size
    if kwargs.get("mask"):
        call["context_mask"] = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    out = model(x, t, **call)
    assert out.shape == (2, overrides.get("out_channels", 4), 8, 8) and out.isfinite().all()
    assert model(x, 500.0, **call).shape == out.shape  # scalar (continuous) timestep


def test_efficient_layout():
    model = make(efficient=True, num_res_blocks=(1, 2))
    assert model.downsample_factor == 4
    assert type(model.input_blocks[1][0]).__name__ == "Downsample"  # downsample before level 0's blocks
    assert type(model.output_blocks[-1][-1]).__name__ == "Upsample"  # upsample after the last level
    assert len(model.output_blocks) == 2 + 3
    seen = []
    hook = model.full_res_block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x, t, context = inputs()
    model(x, t, context)
    hook.remove()
    conv_in = model.input_blocks[0][0](x)  # the full-resolution features reach the last block
    assert seen[0].shape[-2:] == x.shape[-2:]
    torch.testing.assert_close(seen[0][:, -conv_in.shape[1]:], conv_in / 2 ** 0.5)
    assert make().full_res_block is None
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 6, 6), torch.zeros(1), torch.randn(1, 2, 16))


def test_input_errors():
    model = UNet(**TINY)
    x, t, context = inputs()
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ValueError, match="vector"):
        model(x, t, context, vector=torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNet(**{**TINY, "num_res_blocks": (1, 2, 3)})


SD15_SHAPES = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.7.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.emb_layers.1.weight": (1280, 1280),
    "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "middle_block.2.in_layers.2.weight": (1280, 1280, 3, 3),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.6.0.in_layers.0.weight": (1920,),
    "output_blocks.9.0.in_layers.2.weight": (320, 960, 3, 3),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
}


def test_sd15_parameter_names_and_shapes():
    with torch.device("meta"):
        model = UNet(4, 4, 320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                     num_heads=8, context_dim=768)
    state = model.state_dict()
    assert len(state) == 686
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    assert {k: tuple(state[k].shape) for k in SD15_SHAPES} == SD15_SHAPES
    assert not any(k.startswith("label_emb") for k in state)


def test_sd2_and_sdxl_style_options_on_meta():
    with torch.device("meta"):
        sd2 = UNet(4, 4, 320, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_projection=True)
        vec = UNet(4, 4, 320, channel_mult=(1, 2), attention_levels=(1,), context_dim=32, vector_dim=2816)
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724
    assert sd2.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert sd2.input_blocks[1][1].transformer_blocks[0].attn1.heads == 5
    assert vec.state_dict()["label_emb.0.0.weight"].shape == (1280, 2816)
    assert vec.state_dict()["label_emb.0.2.weight"].shape == (1280, 1280)


def test_mask_makes_output_independent_of_padding():
    model = make().eval()
    x, t, context = inputs(tokens=6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    other = context.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 16) * 10
    with torch.no_grad():
        out = model(x, t, context, mask)
        assert torch.allclose(out, model(x, t, other, mask), atol=1e-5)
        assert not torch.allclose(out, model(x, t, other), atol=1e-3)  # the padding does matter unmasked


def test_zero_output_at_init():
    model = UNet(**{**TINY, "vector_dim": 8})
    x, t, context = inputs()
    assert torch.equal(model(x, t, context, vector=torch.randn(2, 8)), torch.zeros(2, 4, 8, 8))


def test_channels_last_matches_contiguous():
    model = make().eval()
    x, t, context = inputs()
    with torch.no_grad():
        ref = model(x, t, context)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, context)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_forward_backward():
    model = make(use_scale_shift_norm=True)
    x, t, context = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context, context_mask=torch.ones(2, 5, dtype=torch.bool))
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert model.out[2].weight.grad.abs().sum() > 0


def test_gradient_checkpointing_matches():
    grads = []
    for enabled in (False, True):
        model = make(gradient_checkpointing=enabled, vector_dim=6).train()
        x, t, context = inputs()
        model(x, t, context, vector=torch.ones(2, 6)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-4), name


def test_tiny_unet_overfits():
    torch.manual_seed(0)
    model = UNet(**TINY)
    x, t, context = inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x, t, context), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# --- Imagen options: coordinate channels, cross-attention-only transformer blocks ----------------------------
def test_coordinate_channels_give_position_to_a_translation_equivariant_net():
    net = make(coordinate_channels=True, attention_levels=())
    assert net.input_blocks[0][0].in_channels == 4 + 2
    x, t, context = inputs()
    flat = torch.zeros_like(x)  # a constant input: only the coordinates can make the output vary inside
    out = net(flat, t, context=context)
    assert out[..., 2:6, 2:6].flatten(2).std(-1).mean() > 1e-4
    plain = make(attention_levels=())(flat, t, context=context)
    assert plain[..., 3:5, 3:5].flatten(2).std(-1).mean() < out[..., 3:5, 3:5].flatten(2).std(-1).mean()


def test_cross_attention_only_blocks_have_no_self_attention():
    net = make(self_attention=False)
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(not hasattr(b, "attn1") and hasattr(b, "attn2") for b in blocks)
    x, t, context = inputs(size=8)
    assert net(x, t, context=context).shape == x.shape
    # no self-attention: a pixel's output does not depend on far-away pixels beyond the convolutions' reach
    with pytest.raises(ValueError, match="self-attention or cross-attention"):
        make(self_attention=False, context_dim=None)
