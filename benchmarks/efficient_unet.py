"""Training-step time of the Efficient U-Net (Imagen: downsample before each level's blocks, upsample after,
more residual blocks at low resolution, skips scaled by 1/sqrt(2), one full-resolution block at the end)
against the plain UNet at (nearly) equal parameter count, for a super-resolution stage (low-res input
concatenated, no attention), in one process.

    python benchmarks/efficient_unet.py                               # CPU fp32, 64px, batch 16
    python benchmarks/efficient_unet.py --device cuda --dtype bf16 --side 256 --batch 32 --channels 128

The efficient model's per-level block counts are chosen among a few "more blocks at low resolution"
layouts as the one whose parameter count is closest to the plain model's (both counts are printed).
``--json PATH`` also writes the figures as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from t2i.diffusion import diffusion_loss, make_schedule
from t2i.nn.unet import UNet


def build(channels: int, mult: tuple[int, ...], blocks, efficient: bool) -> UNet:
    return UNet(3, 3, channels, channel_mult=mult, num_res_blocks=blocks, attention_levels=(),
                middle_attention=False, num_head_channels=32, vector_dim=None, concat_channels=3,
                num_groups=8, efficient=efficient)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_efficient(channels: int, mult: tuple[int, ...], target: int) -> tuple[UNet, tuple[int, ...]]:
    layouts = [b for b in itertools.product(range(1, 6), repeat=len(mult)) if list(b) == sorted(b)]
    best = min(layouts, key=lambda b: abs(params(build(channels, mult, b, True)) - target))
    return build(channels, mult, best, True), best


def step_time(model: UNet, batch: int, side: int, device: str, dtype: torch.dtype, steps: int) -> float:
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    ac = make_schedule("linear").to(device)
    x = torch.randn(batch, 3, side, side, device=device)
    low = torch.randn(batch, 3, side // 4, side // 4, device=device)
    times = []
    for _ in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = diffusion_loss(lambda a, t: model(a, t, concat=low), x, ac, prediction="v")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                    "that gets <name>-<machine>.json (benchmarks/report.py)")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mult = (1, 2, 2)
    torch.manual_seed(0)
    plain = build(args.channels, mult, 2, False)
    efficient, layout = matched_efficient(args.channels, mult, params(plain))
    rows = [("plain UNet, 2 blocks per level", plain), (f"Efficient U-Net, blocks {layout}", efficient)]
    print(f"device {args.device}, {args.dtype}, {args.side}px, batch {args.batch}, model_channels {args.channels}")
    results = []
    for name, model in rows:
        seconds = step_time(model, args.batch, args.side, args.device, dtype, args.steps)
        results.append(seconds)
        print(f"{name:40s} {params(model) / 1e6:6.2f}M params  {1000 * seconds:8.1f} ms/step  "
              f"{args.batch / seconds:8.1f} images/s")
    print(f"efficient / plain step time: {results[1] / results[0]:.2f}")
    if args.json:
        from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
        figures = {}
        for (key, model), seconds in zip((("plain", plain), ("efficient", efficient)), results):
            figures[f"{key} params"] = {"value": params(model), "unit": "params"}
            figures[f"{key} step"] = {"value": 1000 * seconds, "unit": "ms"}
            figures[f"{key} images/s"] = {"value": args.batch / seconds, "unit": "images/s"}
        figures["efficient/plain"] = {"value": results[1] / results[0], "unit": "x",
                                      "note": f"step time; Efficient U-Net blocks {layout}, plain 2 per level"}
        variant = f"{args.side}px, batch {args.batch}, {args.channels} channels, {args.dtype}"
        write_record(args.json, "efficient_unet", variant, args, figures, torch.device(args.device).type,
                     script=__file__, argv=argv)


if __name__ == "__main__":
    main()
