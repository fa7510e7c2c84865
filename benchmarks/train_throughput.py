"""Training throughput of the LDM stage under each Lightning strategy: images/s, step time, peak GPU memory,
model FLOPs per image and MFU, one table row per strategy.

    python benchmarks/train_throughput.py --config tiny --device cpu --strategy ddp --steps 3 --warmup 1
    python benchmarks/train_throughput.py --config sd --device cuda --batch 32 --steps 20 --warmup 5 \
        --channels-last --strategy ddp deepspeed_stage_1 deepspeed_stage_2 deepspeed_stage_3

Each run is a short training of the real stage (`t2i.stages.diffusion.DiffusionStage`) through the real entry
point (`t2i.cli.train.train` on the composed Hydra config, `strategy=<name>` picking `configs/strategy/<name>.yaml`),
one subprocess per strategy (DeepSpeed and DDP state does not reset inside a process); this process prints the
table. Data: synthetic shards written into a temp dir (precomputed ``latent.npy``, `model.latents_from=batch`)
and a tiny random VAE export (the stage loads its first stage even when the latents come precomputed).

- ``--config tiny``: the `experiment=tiny/ldm` stage (7.0M-parameter UNet on 4x8x8 latents, its small text
  transformer trained jointly, captions tokenized every step).
- ``--config sd``: `experiment=ldm/ldm` with an SD-1.5-sized UNet (model_channels 320, channel_mult 1,2,4,4, 2 res
  blocks, attention at the first three levels, context_dim 768; heads of 64 channels and linear projections as in
  configs/model/ldm.yaml, ``--head-channels 0`` for SD 1.5's 8 heads) on 4x32x32 latents (256px images), with
  the frozen OpenCLIP ViT-L/14 text tower (random weights written here) whose 77x768 token states are precomputed
  into the shards (`t2i.conditioning.precomputed`): every training step is the UNet's, as in SD training on
  precomputed text states.

Timing comes from a callback: ``torch.cuda.synchronize()`` then a clock at each ``on_train_batch_start`` (and
``on_train_batch_end``). "step ms" is the mean time from one batch start to the next over ``--steps`` steps after
``--warmup`` steps: the whole iteration (data wait, forward, backward, optimizer, EMA update, logging); images/s
and MFU come from it. "in-step ms" is start to end of the batch (without the data wait and the stage's EMA
update, which runs after the callbacks' ``on_train_batch_end``). Peak memory is
``torch.cuda.max_memory_allocated()`` over the run. The child exits as soon as the timed steps are done
(``os._exit``): no final checkpoint (an SD-sized checkpoint with optimizer state is ~14 GB), no export.

Model FLOPs per image: forward + backward of the UNet at the run's batch (input, timestep, context of the
training length and mask), counted once with `torch.utils.flop_counter.FlopCounterMode` on the meta device
(no memory, no time; the count is the same on any device), divided by the batch. The text encoder, loss, EMA
and optimizer are not counted (tiny: the jointly trained text tower adds about 12%; sd: none, its text states
are precomputed). MFU = achieved FLOP/s
/ peak FLOP/s, the peak looked up from the device name (bf16 dense: H100 SXM / H100 / H200 989 TFLOP/s, H100
PCIe 756, A100 312), ``n/a`` for an unknown device unless ``--peak-tflops`` is given.

``--channels-last`` converts the UNet (and its EMA copy) to channels_last before the strategy wraps it, and each
batch's latents. DeepSpeed's ZeRO flattens parameters into contiguous buffers and fails on channels_last ones,
so under DeepSpeed only the latents are converted (cuDNN keeps the activations in the input's layout); the
"layout" column says which.

``--json PATH`` also writes the table as a JSON record (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the train_throughput_* modules beside this script

import torch
from train_throughput_child import child
from train_throughput_flops import count_flops, peak_flops
from train_throughput_setup import compose, latent_side, prepare

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")


# ---- the parent: data, FLOPs, one subprocess per strategy, the table ----------------------------------------
def run_child(args, work: Path, strategy: str, timeout: float) -> dict:
    if timeout < 30:
        return {"ok": False, "error": f"skipped: {max(timeout, 0):.0f} s of --budget left"}
    if strategy.startswith("deepspeed") and not args.device.startswith("cuda") \
            and os.environ.get("DS_ACCELERATOR") != "cpu":
        return {"ok": False, "error": "skipped: DeepSpeed needs CUDA (DS_ACCELERATOR=cpu runs ZeRO on the CPU)"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", strategy, "--workdir", str(work),
           "--config", args.config, "--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--workers", str(args.workers), "--head-channels", str(args.head_channels)]
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += [f"--override={o}" for o in args.override]
    log = work / f"{strategy}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)  # its own group: a timeout ends its workers too
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    wall = time.perf_counter() - start
    if args.verbose or code != 0:
        tail = log.read_text(errors="replace").splitlines()[-40 if code != 0 else None:]
        print(f"---- {strategy} (exit {code}, {wall:.0f} s): {log}", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    result_file = work / f"{strategy}.json"
    if code == 0 and result_file.is_file():
        return {**json.loads(result_file.read_text()), "wall_s": wall}
    if code is None:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln.removeprefix("[rank0]: ").strip() for ln in log.read_text(errors="replace").splitlines()]
    errors = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception)\b", ln)]
    last = (errors or [ln for ln in lines if ln] or ["no output"])[-1]
    return {"ok": False, "error": f"exit {code}: {last[:200]}"}


def write_json(args, argv: list[str] | None, rows: list[tuple[str, dict]], peak: float | None, per_image: float,
               fwd: float, params: int) -> None:
    """The table as a JSON record: "<strategy>: <column>" figures (a strategy that did not run: its images/s null,
    the reason in the note)."""
    from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
    figures = {"UNet params": {"value": params, "unit": "params"},
               "UNet GFLOP/image, forward": {"value": fwd / args.batch / 1e9, "unit": "GFLOP"},
               "peak TFLOP/s (bf16 dense)": {"value": peak and peak / 1e12, "unit": "TFLOP/s",
                                             **({} if peak else {"note": "unknown device: no MFU"})}}
    for strategy, r in rows:
        if not r.get("ok"):
            figures[f"{strategy}: images/s"] = {"value": None, "unit": "images/s", "note": r["error"]}
            continue
        images = r["global_batch"] / r["iter_s"]
        mem = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else None
        figures.update({
            f"{strategy}: global batch": {"value": r["global_batch"], "unit": "images"},
            f"{strategy}: images/s": {"value": images, "unit": "images/s"},
            f"{strategy}: step": {"value": 1000 * r["iter_s"], "unit": "ms"},
            f"{strategy}: in-step": {"value": 1000 * r["step_s"], "unit": "ms"},
            f"{strategy}: peak mem": {"value": mem, "unit": "GiB"},
            f"{strategy}: GFLOP/image": {"value": per_image / 1e9, "unit": "GFLOP"},
            f"{strategy}: TFLOP/s": {"value": per_image * images / 1e12, "unit": "TFLOP/s"},
            f"{strategy}: MFU": {"value": 100 * per_image * images / peak if peak else None, "unit": "%"},
            f"{strategy}: precision": {"value": r["precision"], "unit": ""},
            f"{strategy}: layout": {"value": r["layout"], "unit": ""},
        })
    variant = f"{args.config}, batch {args.batch}" + (", channels_last" if args.channels_last else "")
    write_record(args.json, "train_throughput", variant, args, figures,
                 "cuda" if args.device.startswith("cuda") else "cpu",
                 script=__file__, argv=argv)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sd"], default="tiny")
    p.add_argument("--strategy", nargs="+", default=["ddp"], choices=STRATEGIES)
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default: tiny 64, sd 32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on cuda, 32-true on cpu)")
    p.add_argument("--head-channels", type=int, default=64, help="sd: channels per attention head; 0: 8 heads")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: cuda 2, cpu 0)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from its name)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per strategy before its run is killed")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole call: a strategy gets at most what is left (under 30 s: skipped)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--workdir", default=None, help="keep data and logs here (default: a temp dir, removed)")
    p.add_argument("--verbose", action="store_true", help="print each run's log")
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (32 if args.config == "sd" else 64)
    args.workers = args.workers if args.workers is not None else (2 if args.device.startswith("cuda") else 0)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.child:
        child(args, Path(args.workdir))
        return

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="t2i-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        prepare(args, work)
        fwd, total, params = count_flops(compose(args, work, "auto"), args.batch, latent_side(args.config))
        per_image = total / args.batch
        print(f"{args.config} LDM stage: UNet {params:,} params, {latent_side(args.config)}x{latent_side(args.config)}x4"
              f" latents, batch {args.batch}/device, {args.steps} timed steps after {args.warmup}, "
              f"channels_last {args.channels_last}; UNet GFLOP/image fwd {fwd / args.batch / 1e9:.4g}, "
              f"fwd+bwd {per_image / 1e9:.4g} (data ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        rows, device = [], None
        for strategy in args.strategy:
            left = args.budget - (time.perf_counter() - t0) if args.budget else math.inf
            r = run_child(args, work, strategy, min(args.timeout, left))
            shutil.rmtree(work / "runs" / strategy, ignore_errors=True)
            rows.append((strategy, r))
            device = device or r.get("device")
            status = f"{r['wall_s']:.0f} s" if r.get("ok") else r["error"]
            print(f"  {strategy}: {status}", flush=True)
        peak = peak_flops(device or "", args.peak_tflops)
        print(f"\ndevice: {device or 'n/a'}; peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s "
              f"(bf16 dense){' from --peak-tflops' if args.peak_tflops else ''}")
        print("| strategy | global batch | images/s | step ms | in-step ms | peak mem GiB | GFLOP/image "
              "| TFLOP/s | MFU | precision | layout |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for strategy, r in rows:
            if not r.get("ok"):
                print(f"| {strategy} | {args.batch} | - | - | - | - | {per_image / 1e9:.4g} | - | - | - | {r['error']} |")
                continue
            images = r["global_batch"] / r["iter_s"]
            achieved = per_image * images
            mem = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else None
            mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
            print(f"| {strategy} | {r['global_batch']} | {images:.1f} | {1000 * r['iter_s']:.1f} | "
                  f"{1000 * r['step_s']:.1f} | {fmt(mem, '.2f')} | {per_image / 1e9:.4g} | {achieved / 1e12:.3g} | "
                  f"{mfu} | {r['precision']} | {r['layout']} |")
        if args.json:
            write_json(args, argv, rows, peak, per_image, fwd, params)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
