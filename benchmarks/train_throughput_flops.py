"""train_throughput's FLOPs and MFU inputs: the UNet's forward and backward FLOPs counted on the meta device, and
the device's peak FLOP/s looked up from its name."""

from __future__ import annotations

import torch

# bf16 dense tensor-core peaks (no sparsity), matched in order against the lower-cased device name
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("a100", 312.0))


# ---- FLOPs --------------------------------------------------------------------------------------------------
def count_flops(cfg, batch: int, side: int) -> tuple[float, float, int]:
    """(forward FLOPs, forward + backward FLOPs, parameters) of the configured UNet at ``batch``, on meta tensors."""
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode
    if cfg.model.get("text_encoder") is None:
        tokens = 0
    elif cfg.model.text_encoder.get("context_length"):
        tokens = int(cfg.model.text_encoder.context_length)
    else:
        tokens = 77
    with torch.device("meta"):
        unet = instantiate(cfg.model.denoiser)
        x = torch.randn(batch, unet.in_channels, side, side)
        t = torch.randint(0, 1000, (batch,))
        kwargs = {}
        if unet.context_dim is not None:
            kwargs = {"context": torch.randn(batch, max(tokens, 1), unet.context_dim),
                      "context_mask": torch.ones(batch, max(tokens, 1), dtype=torch.bool)}
        if unet.vector_dim:
            kwargs["vector"] = torch.randn(batch, unet.vector_dim)
    counter = FlopCounterMode(display=False)
    with counter:
        out = unet(x, t, **kwargs)
        forward = counter.get_total_flops()
        out.float().square().mean().backward()
    return float(forward), float(counter.get_total_flops()), sum(p.numel() for p in unet.parameters())


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    name = device_name.lower()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)
