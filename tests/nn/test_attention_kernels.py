"""Which fused attention kernel the UNet's attention runs on, read from the profiler's op names.

Self-attention passes no mask, so on a GPU in bf16 it runs FlashAttention. Cross-attention passes the text's
padding mask, which FlashAttention cannot take: it runs the memory-efficient kernel (or cuDNN's), still fused.
On the CPU every call runs PyTorch's flash kernel for the CPU, which takes masks."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from t2i.nn.unet import UNet

# the SD2-base layout (64-channel heads, linear projections), narrow and shallow
SMALL_SD2 = {"in_channels": 4, "out_channels": 4, "model_channels": 64, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attention_levels": (0, 1), "num_head_channels": 64, "context_dim": 96, "use_linear_projection": True,
             "num_groups": 8}


def attention_ops(unet, device, dtype) -> dict[str, int]:
    x = torch.randn(2, 4, 16, 16, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    context = torch.randn(2, 7, 96, device=device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[0, 5:] = False
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof, torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        unet(x, t, context, context_mask=mask).float().pow(2).mean().backward()
    counts: dict[str, int] = {}
    for event in prof.events():
        if "scaled_dot_product" in event.name and event.name.startswith("aten::_"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def layers(unet) -> int:
    return sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")


@pytest.mark.usefixtures("single_thread")
def test_cpu_attention_runs_the_fused_flash_kernel():
    unet = UNet(**SMALL_SD2)
    ops = attention_ops(unet, "cpu", torch.float32)
    # forward only counts the forward kernel (its backward op has another name): self- and cross-attention
    assert ops.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0) == 2 * layers(unet), ops
    assert not any("math" in name for name in ops), ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_self_attention_runs_flash_attention_in_bf16():
    unet = UNet(**SMALL_SD2).cuda()
    ops = attention_ops(unet, "cuda", torch.bfloat16)
    assert ops.get("aten::_scaled_dot_product_flash_attention", 0) == layers(unet), ops  # self-attention
    fused_masked = sum(n for name, n in ops.items() if "efficient" in name or "cudnn" in name)
    assert fused_masked >= layers(unet), ops  # the masked cross-attention: a fused kernel, not the math path
    assert not any("math" in name for name in ops), ops
