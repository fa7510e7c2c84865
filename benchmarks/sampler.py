"""Sampler overhead: time of DDIM-50 beyond the network calls (target <= 5%), and classifier-free
guidance batched (one call of 2B) against two calls of B.

    python benchmarks/sampler.py [--device cuda] [--batch 16]

``--json PATH`` also writes the figures as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.conditioning.cond import Cond
from t2i.diffusion import make_schedule
from t2i.nn.unet import UNet
from t2i.pipelines.sampling import SamplerSettings, sample


class TimedUNet(torch.nn.Module):
    def __init__(self, unet: UNet):
        super().__init__()
        self.unet, self.seconds, self.calls = unet, 0.0, 0

    def forward(self, *args, **kwargs):
        sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)


def run(net, cond, uncond, settings, shape, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    sample(net, make_schedule("linear"), "eps", shape, cond, uncond, settings, torch.Generator().manual_seed(0))
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet(4, 4, 64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                num_head_channels=32, context_dim=128).to(device).eval()
    net = TimedUNet(unet)
    b = args.batch
    cond = Cond(context=torch.randn(b, 16, 128, device=device), context_mask=torch.ones(b, 16, dtype=torch.bool, device=device))
    uncond = Cond(context=torch.zeros(b, 16, 128, device=device), context_mask=torch.ones(b, 16, dtype=torch.bool, device=device))
    shape = (b, 4, 8, 8)
    settings = SamplerSettings(steps=args.steps, guidance_scale=3.0)
    run(net, cond, uncond, settings, shape, device)  # warm-up
    net.seconds, net.calls = 0.0, 0
    total = run(net, cond, uncond, settings, shape, device)
    overhead = (total - net.seconds) / total
    print(f"DDIM-{args.steps}, batch {b}, CFG batched, {device}: total {total * 1000:.0f} ms, network "
          f"{net.seconds * 1000:.0f} ms in {net.calls} calls, sampler overhead {100 * overhead:.1f}%")
    # CFG: one call of 2B (ours) against two calls of B
    x, t = torch.randn(shape, device=device), torch.full((b,), 500, device=device)
    with torch.no_grad():
        two_b = Cond.cat([cond, uncond])
        timings = {}
        for name, fn in (("batched 2B", lambda: unet(torch.cat([x, x]), torch.cat([t, t]), **two_b.as_kwargs())),
                         ("two calls of B", lambda: (unet(x, t, **cond.as_kwargs()), unet(x, t, **uncond.as_kwargs())))):
            fn()
            start = time.perf_counter()
            for _ in range(10):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - start) / 10
    print(f"CFG network time per step: batched {timings['batched 2B'] * 1000:.1f} ms, two calls "
          f"{timings['two calls of B'] * 1000:.1f} ms (batched/two = {timings['batched 2B'] / timings['two calls of B']:.2f})")
    if args.json:
        from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
        figures = {"DDIM total": {"value": 1000 * total, "unit": "ms"},
                   "network": {"value": 1000 * net.seconds, "unit": "ms"},
                   "network calls": {"value": net.calls, "unit": "calls"},
                   "sampler overhead": {"value": 100 * overhead, "unit": "%"},
                   "CFG one call of 2B": {"value": 1000 * timings["batched 2B"], "unit": "ms"},
                   "CFG two calls of B": {"value": 1000 * timings["two calls of B"], "unit": "ms"},
                   "CFG batched/two calls": {"value": timings["batched 2B"] / timings["two calls of B"], "unit": "x"}}
        write_record(args.json, "sampler", f"DDIM-{args.steps}, batch {b}", args, figures, device.type,
                     script=__file__, argv=argv)


if __name__ == "__main__":
    main()
