import math

import pytest
import torch

from t2i.eval.psnr import psnr
from t2i.losses.autoencoder import reconstruction_loss
from t2i.nn.autoencoder import AutoencoderKL, DiagonalGaussian
from t2i.nn.discriminator import PatchDiscriminator
from t2i.nn.layers import group_norm, num_groups_for

TINY = {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "latent_channels": 4}


def test_group_norm_adapts_groups():
    assert num_groups_for(128, 32) == 32
    assert num_groups_for(16, 32) == 16
    assert num_groups_for(24, 32) == 24
    assert num_groups_for(48, 32) == 24
    assert num_groups_for(3, 32) == 3
    gn = group_norm(48)
    assert gn.num_groups == 24 and gn.eps == 1e-6


@pytest.mark.parametrize("channel_mult,factor", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_shapes(channel_mult, factor):
    model = AutoencoderKL(base_channels=16, channel_mult=channel_mult, num_res_blocks=1, latent_channels=4)
    assert model.downsample_factor == factor and model.latent_channels == 4
    x = torch.randn(2, 3, 32, 48)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4, 32 // factor, 48 // factor)
    rec, post = model(x)
    assert rec.shape == x.shape and post.logvar.shape == posterior.mean.shape
    assert model.decode(torch.randn(1, 4, 4, 4)).shape == (1, 3, 4 * factor, 4 * factor)
    assert model.last_layer_weight is model.decoder.conv_out.weight


def test_bad_input_size():
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderKL(**TINY).encode(torch.randn(1, 3, 33, 32))


def test_compvis_parameter_names():
    keys = set(AutoencoderKL(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2).state_dict())
    for key in [
        "encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.bias",
        "encoder.mid.block_2.norm2.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.mid.block_1.conv1.weight",
        "decoder.up.3.block.2.conv2.weight", "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.3.upsample.conv.weight", "decoder.norm_out.bias", "decoder.conv_out.weight",
    ]:
        assert key in keys, key
    assert "encoder.down.3.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    model = AutoencoderKL(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2)
    assert model.encoder.mid.attn_1.q.weight.shape == (128, 128, 1, 1)
    assert model.encoder.conv_out.weight.shape[0] == 8 and model.quant_conv.weight.shape[:2] == (8, 8)


def test_kl_zero_and_closed_form():
    zero = DiagonalGaussian(torch.zeros(3, 8, 4, 4))
    assert torch.allclose(zero.kl(), torch.zeros(3))
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), expected, rtol=1e-5)
    assert torch.equal(post.mode(), mean)
    assert torch.allclose(post.std, (0.5 * logvar).exp())
    x = torch.randn_like(mean)
    nll = 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 / logvar.exp()).sum(dim=(1, 2, 3))
    assert torch.allclose(post.nll(x), nll, rtol=1e-5)


def test_logvar_clamped():
    post = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], dim=1))
    assert post.logvar.item() == -30.0


def test_sample_statistics_and_generator():
    mean = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    logvar = torch.log(torch.tensor([0.25, 4.0])).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = post.sample(torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.tensor([1.5, -2.0]), atol=0.05)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.tensor([0.5, 2.0]), rtol=0.03)
    assert torch.equal(z, post.sample(torch.Generator().manual_seed(0)))


def test_forward_deterministic_mode():
    model = AutoencoderKL(**TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    rec, post = model(x, sample_posterior=False)
    assert torch.allclose(rec, model.decode(post.mode()))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref, _ = model(x, sample_posterior=False)
        model_cl = model.to(memory_format=torch.channels_last)
        out, _ = model_cl(x.contiguous(memory_format=torch.channels_last), sample_posterior=False)
    assert torch.allclose(ref, out, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_forward_backward():
    model = AutoencoderKL(**TINY)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec, post = model(x)
        loss = reconstruction_loss(x, rec) + 1e-6 * post.kl().mean()
    assert rec.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY)
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for flag in (False, True):
        model.set_gradient_checkpointing(flag)
        model.zero_grad()
        rec, _ = model(x, sample_posterior=False)
        rec.square().mean().backward()
        grads.append(model.encoder.conv_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_overfit_single_batch():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    image = torch.stack([xx, yy, 0.5 * torch.sin(3 * xx) * torch.cos(2 * yy)])
    image[:, 10:18, 12:22] = torch.tensor([0.8, -0.6, 0.3]).view(3, 1, 1)
    x = torch.stack([image, image.flip(-1)])
    model = AutoencoderKL(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        rec, post = model(x, sample_posterior=False)
        loss = reconstruction_loss(x, rec, "l2") + 1e-7 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rec, _ = model(x, sample_posterior=False)
    assert psnr(x, rec).min() > 25.0, psnr(x, rec)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patch_discriminator(norm):
    disc = PatchDiscriminator(in_channels=3, base_channels=16, n_layers=3, norm=norm)
    out = disc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.003
    has_norm = any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in disc.modules())
    assert has_norm == (norm != "none")


def test_patch_discriminator_param_count_matches_reference():
    assert sum(p.numel() for p in PatchDiscriminator().parameters()) == 2765633
    assert PatchDiscriminator()(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    with pytest.raises(ValueError):
        PatchDiscriminator(norm="instance")
