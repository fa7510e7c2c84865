"""Training-step time (forward + backward + AdamW step) of the t2i UNet against diffusers'
UNet2DConditionModel at a matched configuration, in one process.

    python benchmarks/unet_step.py                    # CPU fp32, the tiny LDM config
    python benchmarks/unet_step.py --config sd15 --device cuda --dtype bf16 --batch 8

Both models: same channels, blocks per level, attention levels, heads, context width, group norm.
Parameter counts of both are printed (they must agree within 5%). Needs the `bench` extra (diffusers).
``--json PATH`` also writes the figures as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.nn.unet import UNet

CONFIGS = {
    # name: (model_channels, channel_mult, num_res_blocks, attention_levels, head_channels, context_dim,
    #        latent channels, latent side, context length, linear projection)
    "tiny": (64, (1, 2, 2), 1, (1, 2), 32, 128, 4, 8, 16, False),
    "sd15": (320, (1, 2, 4, 4), 2, (0, 1, 2), 40, 768, 4, 64, 77, False),
}


def ours(cfg) -> torch.nn.Module:
    ch, mult, blocks, attn, head_ch, ctx, lat, _, _, linear = cfg
    heads = 8 if ch == 320 else None  # SD1.5: 8 heads at every level
    kwargs = {"num_heads": heads} if heads else {"num_head_channels": head_ch}
    return UNet(lat, lat, ch, channel_mult=mult, num_res_blocks=blocks, attention_levels=attn,
                context_dim=ctx, use_linear_projection=linear, **kwargs)


def theirs(cfg) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    ch, mult, blocks, attn, head_ch, ctx, lat, _, _, linear = cfg
    widths = tuple(ch * m for m in mult)
    n = len(mult)
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if (n - 1 - i) in attn else "UpBlock2D" for i in range(n))
    heads = 8 if ch == 320 else tuple(w // head_ch for w in widths)
    return UNet2DConditionModel(sample_size=cfg[7], in_channels=lat, out_channels=lat, down_block_types=down,
                                up_block_types=up, block_out_channels=widths, layers_per_block=blocks,
                                cross_attention_dim=ctx, attention_head_dim=heads,
                                use_linear_projection=linear, norm_num_groups=32)


def step_time(model, x, t, ctx, call, device, dtype, steps: int, warmup: int = 3) -> float:
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = call(model, x, t, ctx)
            loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    x = torch.randn(args.batch, cfg[6], cfg[7], cfg[7], device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    ctx = torch.randn(args.batch, cfg[8], cfg[5], device=device)
    a, b = ours(cfg).to(device), theirs(cfg).to(device)
    if args.channels_last:
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    pa, pb = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    results = {}
    for _ in range(2):  # alternate twice, keep the best: less sensitive to a busy machine
        ta = step_time(a, x, t, ctx, lambda m, x, t, c: m(x, t, context=c), device, args.dtype, args.steps)
        tb = step_time(b, x, t, ctx, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample, device,
                       args.dtype, args.steps)
        results["ours"] = min(results.get("ours", ta), ta)
        results["diffusers"] = min(results.get("diffusers", tb), tb)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.config} UNet, batch {args.batch}, {args.dtype}, {name}")
    print(f"  params: ours {pa:,}  diffusers {pb:,}  (diff {100 * (pa - pb) / pb:+.2f}%)")
    print(f"  train step: ours {1000 * results['ours']:.1f} ms  diffusers {1000 * results['diffusers']:.1f} ms  "
          f"ratio ours/theirs {results['ours'] / results['diffusers']:.3f}")
    if args.json:
        from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
        figures = {"ours params": {"value": pa, "unit": "params"},
                   "diffusers params": {"value": pb, "unit": "params"},
                   "ours step": {"value": 1000 * results["ours"], "unit": "ms"},
                   "diffusers step": {"value": 1000 * results["diffusers"], "unit": "ms"},
                   "ours/diffusers": {"value": results["ours"] / results["diffusers"], "unit": "x"}}
        variant = f"{args.config}, {args.dtype}, batch {args.batch}" + (", channels_last" if args.channels_last else "")
        write_record(args.json, "unet_step", variant, args, figures, device.type,
                     script=__file__, argv=argv)


if __name__ == "__main__":
    main()
