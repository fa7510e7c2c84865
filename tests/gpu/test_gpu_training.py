"""On a CUDA device: the UNet under bf16 autocast and channels_last, and the tiny VAE and LDM stages
training a few steps through train(cfg) with bf16-mixed precision; the tiny GLIDE cascade likewise."""

from __future__ import annotations

import pytest
import torch
from t2i_testing import tiny_ldm_overrides, tiny_overrides

from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.nn.unet import UNet

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_unet_bf16_channels_last_matches_fp32():
    torch.manual_seed(0)
    unet = UNet(4, 4, 64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                num_head_channels=32, context_dim=128).cuda()
    for p in unet.parameters():  # zero-initialised output layers would make the comparison trivial
        p.data.normal_(0, 0.02)
    x, t = torch.randn(8, 4, 16, 16, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    ctx = torch.randn(8, 12, 128, device="cuda")
    ref = unet(x, t, context=ctx)
    fast = unet.to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last), t, context=ctx)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_vae_and_ldm_train_on_gpu(small_shapes, tmp_path):
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed"]
    vae = train(compose_config(tiny_overrides(small_shapes, tmp_path / "vae", "trainer.max_steps=5", *gpu)))
    assert vae.metrics["val/psnr"] > 0
    ldm = train(compose_config(tiny_ldm_overrides(small_shapes, vae.export_dir, tmp_path / "ldm",
                                                  "trainer.max_steps=5", *gpu)))
    assert ldm.metrics["train/loss"] > 0 and (ldm.export_dir / "model.safetensors").is_file()


def test_glide_cascade_trains_and_samples_on_gpu(small_shapes, tmp_path):
    """The tiny GLIDE base and SR stages (pixel space, text encoders trained jointly) a few bf16 steps on the
    GPU, then the cascade sampled there with dynamic thresholding and classifier-free guidance."""
    from t2i.pipelines.cascade import CascadePipeline
    from t2i.pipelines.sampling import SamplerSettings

    common = [f"data.train_manifest={small_shapes}/train", f"data.val_manifest={small_shapes}/val",
              "data.batch_size=16", "data.num_workers=0", "data.min_samples_for_check=100000", "logger=csv",
              "trainer.max_steps=5", "trainer.limit_val_batches=1", "trainer.accelerator=gpu", "trainer.devices=1",
              "trainer.precision=bf16-mixed", "model.sampler.steps=3"]
    base = train(compose_config(["experiment=tiny/glide_base", f"run_dir={tmp_path}/base", *common]))
    sr = train(compose_config(["experiment=tiny/glide_sr", f"run_dir={tmp_path}/sr", *common]))
    pipe = CascadePipeline.from_exports(base.export_dir, [sr.export_dir], device="cuda")
    settings = SamplerSettings(steps=4, guidance_scale=5.0, thresholding="dynamic")
    small, large = pipe.stages(["a small red circle in the top on a black background"] * 2, settings, seed=0)
    assert small.device.type == "cuda" and large.shape == (2, 3, 64, 64) and large.abs().max() <= 1
