"""Training-step time (forward + backward + AdamW step) of the t2i UNet against diffusers'
UNet2DConditionModel at a matched configuration, in one process.

    python benchmarks/unet_step.py                    # CPU fp32, the tiny LDM config
    python benchmarks/unet_step.py --config sd15 --device cuda --dtype bf16 --batch 8
    python benchmarks/unet_step.py --config sd2-256 --device cuda --dtype bf16 --channels-last --fused --compile

Both models: same channels, blocks per level, attention levels, heads, context width, group norm.
Parameter counts of both are printed (they must agree within 5%). Needs the `bench` extra (diffusers).

Configs: ``tiny`` (the tiny LDM), ``sd15`` (SD 1.5: 8 heads, conv projections, context 768, 64x64 latents),
``sd2-256`` / ``sd2-512`` (SD 2 base: 64-channel heads, linear projections, context 1024, 77 tokens, 32x32 / 64x64
latents, i.e. 256^2 / 512^2 images; 865,910,724 parameters each).

Switches, applied to both models alike:

- ``--channels-last``: weights and input in NHWC.
- ``--fused``: ``torch.optim.AdamW(fused=True)``.
- ``--compile [blocks|model]``: ``nn.Module.compile(dynamic=False)`` (inductor, static shapes) of each block (ours: every
  module of ``input_blocks``, ``middle_block`` and ``output_blocks``, as ``compile.scope=blocks`` in training;
  diffusers: every module of ``down_blocks``, ``mid_block`` and ``up_blocks``; the time embedding, ``conv_in`` and
  the output head stay eager in both) or of the whole model (``model``). Dynamo's recompile limit is raised for
  both (our blocks share one forward, `t2i.nn.compile`). The compile happens in the first warm-up step, whose
  time is printed apart.

The step time is the median over ``--steps`` steps after 3 warm-up steps, the best of two rounds that alternate
the two models. FLOPs per image (forward + backward) are counted for each model with
`torch.utils.flop_counter.FlopCounterMode` on the meta device; on a GPU with a known peak (or ``--peak-tflops``)
the achieved TFLOP/s and MFU of each are printed too.
``--json PATH`` also writes the figures as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch

from t2i.nn.unet import UNet


class Config(NamedTuple):
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    num_heads: int  # heads at every level when head_channels <= 0
    head_channels: int  # channels per head (heads = width // head_channels) when > 0
    context_dim: int
    latent_channels: int
    latent_side: int
    context_length: int
    linear_projection: bool
    batch: int  # default --batch


CONFIGS = {
    "tiny": Config(64, (1, 2, 2), 1, (1, 2), 0, 32, 128, 4, 8, 16, False, 64),
    "sd15": Config(320, (1, 2, 4, 4), 2, (0, 1, 2), 8, 0, 768, 4, 64, 77, False, 8),
    "sd2-256": Config(320, (1, 2, 4, 4), 2, (0, 1, 2), 0, 64, 1024, 4, 32, 77, True, 64),
    "sd2-512": Config(320, (1, 2, 4, 4), 2, (0, 1, 2), 0, 64, 1024, 4, 64, 77, True, 16),
}


def ours(cfg: Config) -> torch.nn.Module:
    heads = {"num_heads": cfg.num_heads} if cfg.head_channels <= 0 else {"num_head_channels": cfg.head_channels}
    return UNet(cfg.latent_channels, cfg.latent_channels, cfg.model_channels, channel_mult=cfg.channel_mult,
                num_res_blocks=cfg.num_res_blocks, attention_levels=cfg.attention_levels,
                context_dim=cfg.context_dim, use_linear_projection=cfg.linear_projection, **heads)


def theirs(cfg: Config) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    n = len(cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if (n - 1 - i) in cfg.attention_levels else "UpBlock2D" for i in range(n))
    # diffusers' (legacy) attention_head_dim is the number of heads per level, as in SD's own configs
    heads = cfg.num_heads if cfg.head_channels <= 0 else tuple(w // cfg.head_channels for w in widths)
    return UNet2DConditionModel(sample_size=cfg.latent_side, in_channels=cfg.latent_channels,
                                out_channels=cfg.latent_channels, down_block_types=down, up_block_types=up,
                                block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
                                cross_attention_dim=cfg.context_dim, attention_head_dim=heads,
                                use_linear_projection=cfg.linear_projection, norm_num_groups=32)


def call_ours(m, x, t, c):
    return m(x, t, context=c)


def call_theirs(m, x, t, c):
    return m(x, t, encoder_hidden_states=c).sample


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``--compile blocks`` compiles: the UNet's down/middle/up blocks."""
    if isinstance(model, UNet):
        return [*model.input_blocks, model.middle_block, *model.output_blocks]
    return [*model.down_blocks, model.mid_block, *model.up_blocks]


def compile_model(model: torch.nn.Module, scope: str) -> int:
    """Compile ``model`` in place (``nn.Module.compile``) at ``scope``; returns how many modules were compiled."""
    modules = [model] if scope == "model" else blocks(model)
    for module in modules:  # static shapes, as training (compile.dynamic=false): blocks of one forward at
        module.compile(dynamic=False)  # several shapes would otherwise turn dynamic on their second compile
    return len(modules)


def count_flops(build, cfg: Config, call) -> float:
    """Forward + backward FLOPs per image of the model ``build(cfg)``, on the meta device (batch 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build(cfg)
        x = torch.randn(2, cfg.latent_channels, cfg.latent_side, cfg.latent_side)
        t = torch.randint(0, 1000, (2,))
        c = torch.randn(2, cfg.context_length, cfg.context_dim)
    with FlopCounterMode(display=False) as counter:
        call(model, x, t, c).float().square().mean().backward()
    return counter.get_total_flops() / 2


def step_time(model, x, t, ctx, call, device, dtype, steps: int, warmup: int = 3,
              fused: bool = False) -> tuple[float, float]:
    """(median step time over ``steps`` after ``warmup``, the first step's time)."""
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = []
    for _ in range(warmup + steps):
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
        times.append(time.perf_counter() - start)
    first, timed = times[0], sorted(times[warmup:])
    return timed[len(timed) // 2], first


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=None,
                   help="default: tiny 64, sd15 8, sd2-256 64, sd2-512 16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fused", action="store_true", help="fused AdamW for both models")
    p.add_argument("--compile", nargs="?", const="blocks", choices=["blocks", "model"], default=None,
                   help="torch.compile both models: each block (default) or the whole model")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from its name)")
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    args.batch = args.batch or cfg.batch
    torch.manual_seed(0)
    x = torch.randn(args.batch, cfg.latent_channels, cfg.latent_side, cfg.latent_side, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    ctx = torch.randn(args.batch, cfg.context_length, cfg.context_dim, device=device)
    with torch.device(device):  # built in place: an SD-sized init on the CPU takes seconds
        a, b = ours(cfg), theirs(cfg)
    if args.channels_last:
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    pa, pb = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    fa, fb = count_flops(ours, cfg, call_ours), count_flops(theirs, cfg, call_theirs)
    compiled = ""
    if args.compile:
        config = torch._dynamo.config  # our blocks share one forward: 8 recompiles per code object would not do
        config.recompile_limit = max(config.recompile_limit, 64)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 512)
        compiled = f"compile {args.compile} ({compile_model(a, args.compile)} / {compile_model(b, args.compile)} modules)"
    results, first = {}, {}
    for _ in range(2):  # alternate twice, keep the best: less sensitive to a busy machine
        for name, model, call in (("ours", a, call_ours), ("diffusers", b, call_theirs)):
            median, start = step_time(model, x, t, ctx, call, device, args.dtype, args.steps, fused=args.fused)
            results[name] = min(results.get(name, median), median)
            first.setdefault(name, start)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = None
    if device.type == "cuda" or args.peak_tflops:
        from train_throughput import peak_flops  # benchmarks/train_throughput.py (this folder is on sys.path)
        peak = peak_flops(name, args.peak_tflops)
    switches = [s for s in ("channels_last" if args.channels_last else "", "fused AdamW" if args.fused else "",
                            compiled) if s]
    print(f"{args.config} UNet, batch {args.batch}, {args.dtype}, {', '.join(switches) or 'eager'}, {name}")
    print(f"  params: ours {pa:,}  diffusers {pb:,}  (diff {100 * (pa - pb) / pb:+.2f}%)")
    print(f"  GFLOP/image fwd+bwd: ours {fa / 1e9:.4g}  diffusers {fb / 1e9:.4g}")
    rate = {k: (fa if k == "ours" else fb) * args.batch / v for k, v in results.items()}  # FLOP/s
    mfu = {k: f", {rate[k] / 1e12:.0f} TFLOP/s, MFU {100 * rate[k] / peak:.1f}%" if peak else "" for k in rate}
    print(f"  train step: ours {1000 * results['ours']:.1f} ms{mfu['ours']}  diffusers "
          f"{1000 * results['diffusers']:.1f} ms{mfu['diffusers']}  ratio ours/theirs "
          f"{results['ours'] / results['diffusers']:.3f}")
    print(f"  first step (with any compile): ours {first['ours']:.1f} s  diffusers {first['diffusers']:.1f} s")
    if args.json:
        from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
        figures = {"ours params": {"value": pa, "unit": "params"},
                   "diffusers params": {"value": pb, "unit": "params"},
                   "ours step": {"value": 1000 * results["ours"], "unit": "ms"},
                   "diffusers step": {"value": 1000 * results["diffusers"], "unit": "ms"},
                   "ours/diffusers": {"value": results["ours"] / results["diffusers"], "unit": "x"}}
        if peak:
            figures.update({"ours MFU": {"value": 100 * rate["ours"] / peak, "unit": "%"},
                            "diffusers MFU": {"value": 100 * rate["diffusers"] / peak, "unit": "%"}})
        if args.compile:
            figures.update({"ours first step": {"value": first["ours"], "unit": "s"},
                            "diffusers first step": {"value": first["diffusers"], "unit": "s"}})
        variant = f"{args.config}, {args.dtype}, batch {args.batch}" + (", channels_last" if args.channels_last else "")
        variant += (", fused" if args.fused else "") + (f", compile {args.compile}" if args.compile else "")
        write_record(args.json, "unet_step", variant, args, figures, device.type,
                     script=__file__, argv=argv)


if __name__ == "__main__":
    main()
