"""Which options make the tiny LDM's training step cheaper on this CPU: seconds per step of the real stage
(`experiment=tiny/ldm`: UNet, jointly trained text tower, min-SNR loss, AdamW, EMA) under each option, timed in
one process, interleaved round by round so that a shared machine's drifting load falls on every option alike.

    python benchmarks/cpu_step_options.py [--batch 128] [--rounds 5] [--steps 4] [--compile]

Options: channels_last (NHWC convolution weights, `channels_last=true`), fused AdamW (one kernel for every
parameter's update), both, and with --compile `torch.compile` of the UNet (its compile time printed apart).
Synthetic inputs: random 8x8x4 latents and shapes captions, so no data or VAE training is needed.
Prints s/step (median over rounds) and each option's time over the default's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import write_vae_export

from t2i.cli.config import compose_config
from t2i.eval.shapes import eval_prompts


def build(vae: Path, channels_last: bool, fused: bool, compiled: bool):
    from hydra.utils import instantiate
    torch.manual_seed(0)
    stage = instantiate(compose_config(["experiment=tiny/ldm", f"model.target.export={vae}",
                                        "model.target.precomputed=true", "channels_last=false"]).model)
    if channels_last:
        stage = stage.to(memory_format=torch.channels_last)
    if compiled:
        stage.net["denoiser"].compile()  # in place: parameter names (and so the EMA's) stay as they are
    params = [p for p in stage.net.parameters() if p.requires_grad]
    return stage, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused or None)


def step(stage, opt, batch) -> None:
    loss, _ = stage.loss(batch, stage.net)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(stage.net.parameters(), 1.0)
    opt.step()
    stage.ema.update(stage.net)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per option per round")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet")
    args = p.parse_args()
    options = {"default": (False, False, False), "channels_last": (True, False, False),
               "fused AdamW": (False, True, False), "channels_last + fused AdamW": (True, True, False)}
    if args.compile:
        options["torch.compile (UNet)"] = (False, False, True)
    batch = {"latent": torch.randn(args.batch, 4, 8, 8),
             "caption": (eval_prompts(200, "seen") * (args.batch // 200 + 1))[:args.batch]}
    with tempfile.TemporaryDirectory() as tmp:
        write_vae_export(Path(tmp) / "vae", "tiny")
        built = {}
        for name, flags in options.items():
            built[name] = build(Path(tmp) / "vae", *flags)
            start = time.perf_counter()
            for _ in range(2):  # warm-up (and compilation)
                step(*built[name], batch)
            if flags[2]:
                print(f"torch.compile: first two steps {time.perf_counter() - start:.1f} s", flush=True)
        times = {name: [] for name in options}
        for _ in range(args.rounds):
            for name in options:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(*built[name], batch)
                times[name].append((time.perf_counter() - start) / args.steps)
    print(f"tiny LDM training step, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    base = statistics.median(times["default"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:30s} {med:.3f} s/step  (min {min(ts):.3f}, max {max(ts):.3f})  {med / base:.2f} x default")


if __name__ == "__main__":
    main()
