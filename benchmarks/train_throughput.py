"""Training throughput of the LDM stage under each Lightning strategy: images/s, step time, peak GPU memory,
model FLOPs per image and MFU, one table row per strategy.

    python benchmarks/train_throughput.py --config tiny --device cpu --strategy ddp --steps 3 --warmup 1
    python benchmarks/train_throughput.py --config sd --device cuda --batch 32 --steps 20 --warmup 5 \
        --channels-last --strategy ddp deepspeed_stage_1 deepspeed_stage_2 deepspeed_stage_3

Each run is a short training of the real stage (`t2i.stages.diffusion.DiffusionStage`) through the real entry
point (`t2i.cli.train.train` on the composed Hydra config, `strategy=<name>` picking `configs/strategy/<name>.yaml`),
one subprocess per strategy (this script again, with the hidden ``--child``: DeepSpeed and DDP state does not
reset inside a process); this process prints the table. Data: synthetic shards written into a temp dir (precomputed ``latent.npy``, `model.target.precomputed=true`)
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

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")
CAPTION_WORDS = ("a", "small", "large", "red", "blue", "green", "circle", "square", "triangle", "in", "the",
                 "top", "left", "center", "on", "white", "black", "background")
# bf16 dense tensor-core peaks (no sparsity), matched in order against the lower-cased device name
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("a100", 312.0))


# ---- one run: its Hydra overrides ---------------------------------------------------------------------------
def latent_side(config: str) -> int:
    return 32 if config == "sd" else 8


def overrides(args, work: Path, strategy: str) -> list[str]:
    """The Hydra overrides of one benchmark run (the same composition `python -m t2i.cli.train` would do)."""
    cuda = args.device.startswith("cuda")
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    common = [
        f"run_dir={work / 'runs' / strategy}", f"strategy={strategy}", "logger=csv", "callbacks.checkpoint=null",
        "export=false", "final_validation=false", f"data.train_manifest={work / 'data'}", "data.val_manifest=null",
        "data.resolution=0", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"data.pin_memory={str(cuda).lower()}", f"model.target.export={work / 'vae'}",
        "model.target.precomputed=true", "model.sample_every_n_steps=0", "model.sample_prompts=[]",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}", "trainer.devices=1", f"trainer.precision={precision}",
        f"trainer.max_steps={args.warmup + args.steps + 1}", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
    ]
    if args.config == "tiny":
        specific = ["experiment=tiny/ldm", "data.array_fields=[latent.npy]"]
    else:
        heads = ([f"model.denoiser.num_head_channels={args.head_channels}"] if args.head_channels > 0
                 else ["model.denoiser.num_head_channels=-1", "model.denoiser.num_heads=8"])
        specific = ["experiment=ldm/ldm", "model.image_size=256",
                    "data.array_fields=[latent.npy,text_tokens.npy,text_mask.npy,text_pooled.npy]",
                    "model.text_encoder.arch=ViT-L-14", f"model.text_encoder.checkpoint_path={work / 'text.safetensors'}",
                    "model.text_encoder.layer=last", "model.text_encoder.context_length=77",
                    "model.denoiser.context_dim=768", "model.cond_dropout.context_dim=768", *heads]
    return [*specific, *common, *args.override]


def compose(args, work: Path, strategy: str, extra: tuple[str, ...] = ()):
    from t2i.cli.config import compose_config
    return compose_config([*overrides(args, work, strategy), *extra])


# ---- one run: its synthetic inputs --------------------------------------------------------------------------
def write_vae_export(folder: Path, config: str) -> None:
    """A tiny random KL autoencoder export with 4 latent channels and the downsampling of the config's latents
    (tiny: 32px -> 8x8, f=4; sd: 256px -> 32x32, f=8): the stage loads it and checks the UNet's channels and the
    latents' shape against it, but never runs it when the latents come from the batch."""
    from t2i.exports import write_export
    from t2i.nn.autoencoder import AutoencoderKL
    node = {"_target_": "t2i.nn.autoencoder.AutoencoderKL", "in_channels": 3, "out_channels": 3, "base_channels": 8,
            "channel_mult": [1, 2, 2, 2] if config == "sd" else [1, 2, 2], "num_res_blocks": 1, "latent_channels": 4, "attn_in_mid": False,
            "num_groups": 4}
    vae = AutoencoderKL(**{k: v for k, v in node.items() if k != "_target_"})
    write_export(folder, "autoencoder", {f"autoencoder.{k}": v for k, v in vae.state_dict().items()},
                 {"model": {"autoencoder": node}}, metrics={"latent_scale": 0.18215})


def write_text_checkpoint(path: Path) -> None:
    """Random weights of the OpenCLIP ViT-L/14 text tower (SD 1.5's text width, 768) in a local file, for the
    frozen encoder of the sd config (its states are precomputed in the shards, so it never runs)."""
    from safetensors.torch import save_file

    from t2i.conditioning.text import OpenClipTextEncoder
    tower, _ = OpenClipTextEncoder.build_tower("ViT-L-14", False)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tower.state_dict().items()}, str(path))


def write_shards(folder: Path, config: str, n: int, shard_size: int = 64) -> None:
    """``n`` samples with a caption and a precomputed ``latent.npy`` (4 x side x side, float16); sd: plus the
    precomputed text states of a 768-wide encoder (77 tokens, all real, as SD conditions on all 77)."""
    import numpy as np

    from t2i.data.derived import npy_bytes, write_tar_atomic
    from t2i.data.manifest import ShardInfo, write_manifest
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side, infos = latent_side(config), []
    for s in range(math.ceil(n / shard_size)):
        samples = []
        for i in range(min(shard_size, n - s * shard_size)):
            caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 12))))
            fields = {"txt": caption.encode(),
                      "latent.npy": npy_bytes(rng.standard_normal((4, side, side), dtype=np.float32).astype(np.float16))}
            if config == "sd":
                fields["text_tokens.npy"] = npy_bytes(rng.standard_normal((77, 768), dtype=np.float32).astype(np.float16))
                fields["text_mask.npy"] = npy_bytes(np.ones(77, dtype=bool))
                fields["text_pooled.npy"] = npy_bytes(rng.standard_normal(768, dtype=np.float32))
            samples.append((f"s{s:04d}x{i:05d}", fields))
        path = folder / f"shard-{s:06d}.tar"
        write_tar_atomic(path, samples)
        infos.append(ShardInfo(str(path), len(samples)))
    write_manifest(folder, infos)


def prepare(args, work: Path) -> None:
    # one epoch holds every step: no loader restart inside the timed window
    write_shards(work / "data", args.config, args.batch * (args.warmup + args.steps + 2))
    write_vae_export(work / "vae", args.config)
    if args.config == "sd":
        write_text_checkpoint(work / "text.safetensors")


# ---- FLOPs per image and the device's peak (MFU) ------------------------------------------------------------
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


# ---- the child: one timed training run (this file run with --child) -----------------------------------------
class StepTimer(L.Callback):
    """Clocks each training batch (synchronizing CUDA first); after ``warmup + steps`` batches writes the figures
    to ``result`` and ends the process (no final checkpoint, no export: they are not what is measured)."""

    def __init__(self, warmup: int, steps: int, result: str, channels_last: bool = False):
        self.warmup, self.steps, self.result, self.channels_last = warmup, steps, result, channels_last
        self.starts: list[float] = []
        self.ends: list[float] = []

    def _clock(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def setup(self, trainer, pl_module, stage: str) -> None:
        # before the strategy moves and wraps the module; ZeRO flattens parameters into its own contiguous
        # buffers and fails on channels_last ones, so under DeepSpeed only the inputs (and so the activations,
        # which cuDNN keeps in the input's layout) are channels_last
        self.layout = "nchw"
        if self.channels_last:
            self.layout = "channels_last"
            if "DeepSpeed" in type(trainer.strategy).__name__:
                self.layout = "channels_last inputs"
            else:
                pl_module.net["denoiser"].to(memory_format=torch.channels_last)
                if getattr(pl_module, "ema", None) is not None:
                    pl_module.ema.module["denoiser"].to(memory_format=torch.channels_last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.starts.append(self._clock(pl_module))
        if len(self.starts) > self.warmup + self.steps:
            self._finish(trainer, pl_module)
        if self.channels_last and isinstance(batch.get("latent"), torch.Tensor):
            batch["latent"] = batch["latent"].contiguous(memory_format=torch.channels_last)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ends.append(self._clock(pl_module))

    def _finish(self, trainer, pl_module) -> None:
        w, n = self.warmup, self.steps
        cuda = pl_module.device.type == "cuda"
        world = trainer.world_size  # devices x nodes
        precision = str(trainer.precision)
        autocast = getattr(trainer.strategy.precision_plugin, "autocast_dtype", None)
        if autocast is not None and precision.startswith("32"):  # t2i's DeepSpeed: autocast over fp32 weights
            precision = "bf16-mixed" if autocast == torch.bfloat16 else f"{autocast}-mixed"
        result = {
            "ok": True,
            "iter_s": (self.starts[w + n] - self.starts[w]) / n,
            "step_s": sum(self.ends[i] - self.starts[i] for i in range(w, w + n)) / n,
            "global_batch": trainer.datamodule.batch_size * world * trainer.accumulate_grad_batches,
            "world_size": world,
            "precision": precision,
            "layout": self.layout,
            "strategy_class": type(trainer.strategy).__name__,
            "device": (torch.cuda.get_device_name(pl_module.device) if cuda
                       else f"CPU ({torch.get_num_threads()} threads)"),
            "peak_mem_bytes": torch.cuda.max_memory_allocated(pl_module.device) if cuda else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(pl_module.device) if cuda else None,
        }
        Path(self.result).write_text(json.dumps(result))
        print(f"[train_throughput] {json.dumps(result)}", flush=True)
        sys.stderr.flush()
        os._exit(0)  # skip teardown: the final checkpoint of an SD-sized run is ~14 GB


def child(args, work: Path) -> None:
    from t2i.cli.train import train
    result = work / f"{args.child}.json"
    # the child runs this file as a script: `__main__.StepTimer`, which Hydra finds in sys.modules
    timer = [f"+callbacks.throughput._target_={__name__}.StepTimer", f"+callbacks.throughput.warmup={args.warmup}",
             f"+callbacks.throughput.steps={args.steps}", f"+callbacks.throughput.result={result}",
             f"+callbacks.throughput.channels_last={str(args.channels_last).lower()}"]
    cfg = compose(args, work, args.child, tuple(timer))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    raise SystemExit(f"training ended after fewer than {args.warmup + args.steps + 1} batches")


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
