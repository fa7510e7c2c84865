"""Training throughput of the LDM stage under each Lightning strategy and set of speed switches: images/s, step
time, peak GPU memory, model FLOPs per image and MFU, one table row per (strategy, switch set).

    python benchmarks/train_throughput.py --config tiny --device cpu --strategy ddp --steps 3 --warmup 1
    python benchmarks/train_throughput.py --config sd2 --side 256 --device cuda --batch 64 --steps 15 --warmup 3 \
        --strategy ddp fsdp --switches plain channels_last+fused+compile
    python benchmarks/train_throughput.py --config sd2 --side 512 --strategy ddp fsdp --dry-run   # compose only
    python benchmarks/train_throughput.py --config sd2 --memory-table [--activations]    # computed memory/GPU

Each run is a short training of the real stage (`t2i.stages.diffusion.DiffusionStage`) through the real entry
point (`t2i.cli.train.train` on the composed Hydra config, `strategy=<name>` picking `configs/strategy/<name>.yaml`),
one subprocess per run (this script again, with the hidden ``--child``: DeepSpeed and DDP state does not
reset inside a process); this process prints the table. Data: synthetic shards written into a temp dir (precomputed
``latent.npy``, `model.target.precomputed=true`) and a tiny random VAE export (the stage loads its first stage even
when the latents come precomputed).

- ``--config tiny``: the `experiment=tiny/ldm` stage (7.0M-parameter UNet on 4x8x8 latents, its small text
  transformer trained jointly, captions tokenized every step).
- ``--config sd``: `experiment=ldm/ldm` with an SD-1.5-sized UNet (model_channels 320, channel_mult 1,2,4,4, 2 res
  blocks, attention at the first three levels, context_dim 768; heads of 64 channels and linear projections as in
  configs/model/ldm.yaml, ``--head-channels 0`` for SD 1.5's 8 heads) on 4x32x32 latents (256px images), with
  the frozen OpenCLIP ViT-L/14 text tower whose 77x768 token states are precomputed into the shards
  (`t2i.conditioning.precomputed`): every training step is the UNet's, as in SD training on precomputed text states.
- ``--config sd2``: the Stable Diffusion 2 base layout, configs/model/ldm.yaml as it is (the same UNet with
  context_dim 1024, 64-channel heads, linear projections; GroupNorm eps 1e-5 as experiment=sd/v2; 865,910,724
  parameters), conditioned on 77x1024 states precomputed for the frozen OpenCLIP ViT-H/14 text tower (penultimate
  layer), at ``--side`` 256 or 512 (4x32x32 or 4x64x64 latents).

The frozen text tower is loaded strictly but never runs (its states come from the shards), so its checkpoint
holds zeros: every tensor a view of one shared zero buffer the size of the largest (the token embedding), which
`torch.save` stores once (ViT-H/14: 101 MB on disk instead of 708 MB of float16).

Speed switches (``--switches``, one row per strategy and switch set; names joined with ``+``):
``plain``; ``channels_last`` (below); ``fused`` (``model.optimizer.fused=true``: torch AdamW's fused kernel);
``compile`` (``compile.scope=blocks``: each UNet block compiled, `t2i.nn.compile`); ``compile_denoiser``
(``compile.scope=denoiser``: the whole UNet one graph); ``checkpointing``
(``model.denoiser.gradient_checkpointing=true``: each block's activations recomputed in backward). Every run sets
each switch on or off, so ``plain`` is all off even where the experiment turns some on (experiment=ldm/ldm compiles
the blocks and fuses AdamW by default). FLOPs per image are the model's (forward + backward once), so a
checkpointing row's MFU does not count the recomputed forward.

Timing comes from a callback: ``torch.cuda.synchronize()`` then a clock at each ``on_train_batch_start`` (and
``on_train_batch_end``). "step ms" is the mean time from one batch start to the next over ``--steps`` steps after
``--warmup`` steps: the whole iteration (data wait, forward, backward, optimizer, EMA update, logging); images/s
and MFU come from it. "in-step ms" is start to end of the batch (without the data wait and the stage's EMA
update, which runs after the callbacks' ``on_train_batch_end``). Peak memory is
``torch.cuda.max_memory_allocated()`` over the run. The child exits as soon as the timed steps are done
(``os._exit``): no final checkpoint (an SD-sized checkpoint with optimizer state is ~14 GB), no export.
A compiled run compiles during its first warm-up step (keep ``--warmup`` >= 2).

Model FLOPs per image: forward + backward of the UNet at the run's batch (input, timestep, context of the
training length and mask), counted once with `torch.utils.flop_counter.FlopCounterMode` on the meta device
(no memory, no time; the count is the same on any device), divided by the batch. The text encoder, loss, EMA
and optimizer are not counted (tiny: the jointly trained text tower adds about 12%; sd, sd2: none, their text
states are precomputed). MFU = achieved FLOP/s / peak FLOP/s, the peak looked up from the device name (bf16 dense:
H100 SXM / H100 / H200 989 TFLOP/s, H100 PCIe 756, A100 312), ``n/a`` for an unknown device unless
``--peak-tflops`` is given.

``channels_last`` (or ``--channels-last``, which adds it to every switch set) converts the UNet (and its EMA copy)
to channels_last before the strategy wraps it, and each batch's latents. DeepSpeed's ZeRO flattens parameters
into contiguous buffers and fails on channels_last ones, and FSDP2 (`strategy=fsdp`) re-lays each parameter out
as contiguous dim-0 shards, so under those only the latents are converted (cuDNN keeps the activations in the
input's layout); the "layout" column says which.

``--memory-table`` prints the per-GPU memory of the fp32 weights, gradients, AdamW states and EMA copy under each
strategy for 1, 8 and 64 GPUs, COMPUTED from the exact parameter count (nothing is trained); ``--activations``
adds the activation memory per image measured on the CPU (docs/scaling.md).

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
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")
CAPTION_WORDS = ("a", "small", "large", "red", "blue", "green", "circle", "square", "triangle", "in", "the",
                 "top", "left", "center", "on", "white", "black", "background")
# bf16 dense tensor-core peaks (no sparsity), matched in order against the lower-cased device name
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("a100", 312.0))
# the frozen text tower of each real-size config: open_clip arch, layer whose states condition the UNet, width
TEXT = {"sd": ("ViT-L-14", "last", 768), "sd2": ("ViT-H-14", "penultimate", 1024)}
TEXT_TOKENS = 77
# speed switches (--switches). Every run sets each of them, on or off (switch_overrides): experiments may turn some
# on (experiment=ldm/ldm: compile.scope=blocks, fused AdamW), and `plain` means all off
SWITCHES = {
    "plain": "no switch",
    "channels_last": "UNet weights and latents in NHWC (the StepTimer callback, strategy-aware)",
    "fused": "model.optimizer.fused=true (torch AdamW's fused step)",
    "compile": "compile.scope=blocks (each UNet block compiled, t2i.nn.compile)",
    "compile_denoiser": "compile.scope=denoiser (the whole UNet one graph)",
    "checkpointing": "model.denoiser.gradient_checkpointing=true (each block recomputed in backward)",
}
# per-device batch when --batch is not given: (config, image side) -> batch. sd2: 64 at 256^2 and 16 at 512^2
# fit an 80 GB GPU under ddp with room to spare (docs/scaling.md, "Memory per GPU for the SD2-base UNet")
DEFAULT_BATCH = {("tiny", None): 64, ("sd", 256): 32, ("sd", 512): 8, ("sd2", 256): 64, ("sd2", 512): 16}


# ---- the runs: strategies x switch sets -----------------------------------------------------------------------
def parse_switches(text: str, channels_last: bool = False) -> str:
    """A switch set ``a+b+c`` checked and normalised (``--channels-last`` adds channels_last)."""
    names = [n.strip() for n in text.split("+") if n.strip()]
    unknown = [n for n in names if n not in SWITCHES]
    if not names or unknown:
        raise ValueError(f"unknown switch(es) {unknown or [text]} in {text!r}: use {', '.join(SWITCHES)}, joined "
                         f"with '+'")
    if "plain" in names and len(names) > 1:
        raise ValueError(f"{text!r}: 'plain' is the set without switches; it combines with nothing")
    if "compile" in names and "compile_denoiser" in names:
        raise ValueError(f"{text!r}: compile (blocks) and compile_denoiser (whole UNet) exclude each other")
    if channels_last and "channels_last" not in names:
        names = [n for n in names if n != "plain"] + ["channels_last"]
    return "+".join(dict.fromkeys(names))


def switch_overrides(switches: str) -> list[str]:
    """The Hydra overrides of a switch set: every switch set on or off, whatever the experiment's defaults."""
    names = set(switches.split("+"))
    scope = "blocks" if "compile" in names else "denoiser" if "compile_denoiser" in names else "null"
    return ["channels_last=false",  # the layout is the StepTimer callback's (DeepSpeed and FSDP need inputs only)
            f"compile.scope={scope}",
            f"++model.optimizer.fused={'true' if 'fused' in names else 'null'}",  # ++: add or override
            f"model.denoiser.gradient_checkpointing={str('checkpointing' in names).lower()}"]


def run_id(strategy: str, switches: str) -> str:
    """The run's file stem (result json, log, run folder): the strategy for a plain run."""
    return strategy if switches == "plain" else f"{strategy}__{switches}"


def latent_side(args) -> int:
    return 8 if args.config == "tiny" else args.side // 8


# ---- one run: its Hydra overrides ---------------------------------------------------------------------------
def overrides(args, work: Path, strategy: str, switches: str = "plain") -> list[str]:
    """The Hydra overrides of one benchmark run (the same composition `python -m t2i.cli.train` would do)."""
    cuda = args.device.startswith("cuda")
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    common = [
        f"run_dir={work / 'runs' / run_id(strategy, switches)}", f"strategy={strategy}", "logger=csv",
        "callbacks.checkpoint=null",
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
        arch, layer, width = TEXT[args.config]
        if args.config == "sd2":  # configs/model/ldm.yaml's UNet as it is; SD's GroupNorm eps (experiment=sd/v2)
            unet = ["model.denoiser.num_head_channels=64", "model.denoiser.use_linear_projection=true",
                    "model.denoiser.norm_eps=1e-5"]
        elif args.head_channels > 0:
            unet = [f"model.denoiser.num_head_channels={args.head_channels}"]
        else:
            unet = ["model.denoiser.num_head_channels=-1", "model.denoiser.num_heads=8"]
        specific = ["experiment=ldm/ldm", f"model.image_size={args.side}",
                    "data.array_fields=[latent.npy,text_tokens.npy,text_mask.npy,text_pooled.npy]",
                    f"model.text_encoder.arch={arch}", f"model.text_encoder.checkpoint_path={work / 'text.pt'}",
                    f"model.text_encoder.layer={layer}", f"model.text_encoder.context_length={TEXT_TOKENS}",
                    f"model.denoiser.context_dim={width}", f"model.cond_dropout.context_dim={width}", *unet]
    return [*specific, *common, *switch_overrides(switches), *args.override]


def compose(args, work: Path, strategy: str, switches: str = "plain", extra: tuple[str, ...] = ()):
    from t2i.cli.config import compose_config
    return compose_config([*overrides(args, work, strategy, switches), *extra])


# ---- one run: its synthetic inputs --------------------------------------------------------------------------
def write_vae_export(folder: Path, config: str) -> None:
    """A tiny random KL autoencoder export with 4 latent channels and the downsampling of the config's latents
    (tiny: 32px -> 8x8, f=4; sd, sd2: f=8): the stage loads it and checks the UNet's channels and the latents'
    shape against it, but never runs it when the latents come from the batch."""
    from t2i.exports import write_export
    from t2i.nn.autoencoder import AutoencoderKL
    node = {"_target_": "t2i.nn.autoencoder.AutoencoderKL", "in_channels": 3, "out_channels": 3, "base_channels": 8,
            "channel_mult": [1, 2, 2] if config == "tiny" else [1, 2, 2, 2], "num_res_blocks": 1,
            "latent_channels": 4, "attn_in_mid": False, "num_groups": 4}
    vae = AutoencoderKL(**{k: v for k, v in node.items() if k != "_target_"})
    write_export(folder, "autoencoder", {f"autoencoder.{k}": v for k, v in vae.state_dict().items()},
                 {"model": {"autoencoder": node}}, metrics={"latent_scale": 0.18215})


def write_text_checkpoint(path: Path, arch: str) -> int:
    """A checkpoint of the OpenCLIP text tower ``arch`` for the frozen encoder of the sd/sd2 configs, which the
    stage loads strictly but never runs (its states are precomputed in the shards). Zeros, as cheap as it gets:
    the tower is built on the meta device (no init), and every tensor is a view of one zero float16 buffer the
    size of the largest, which `torch.save` stores once. Returns the file's size in bytes."""
    from t2i.conditioning.text import OpenClipTextEncoder
    with torch.device("meta"):
        tower, _ = OpenClipTextEncoder.build_tower(arch, False)
    shapes = {k: v.shape for k, v in tower.state_dict().items()}
    buffer = torch.zeros(max(math.prod(s) for s in shapes.values()), dtype=torch.float16)
    torch.save({k: buffer[:math.prod(s)].view(s) for k, s in shapes.items()}, path)
    return path.stat().st_size


def write_shards(folder: Path, config: str, n: int, side: int, text_width: int = 0, shard_size: int = 64) -> None:
    """``n`` samples with a caption and a precomputed ``latent.npy`` (4 x side x side, float16); with
    ``text_width``: plus precomputed text states of that width (77 tokens, all real, as SD conditions on all 77).
    The arrays are drawn from a pool of 16 (their values do not matter, only their decode and transfer)."""
    import numpy as np

    from t2i.data.derived import npy_bytes, write_tar_atomic
    from t2i.data.manifest import ShardInfo, write_manifest
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = 16
    latents = [npy_bytes(rng.standard_normal((4, side, side), dtype=np.float32).astype(np.float16))
               for _ in range(pool)]
    if text_width:
        tokens = [npy_bytes(rng.standard_normal((TEXT_TOKENS, text_width), dtype=np.float32).astype(np.float16))
                  for _ in range(pool)]
        pooled = [npy_bytes(rng.standard_normal(text_width, dtype=np.float32)) for _ in range(pool)]
        mask = npy_bytes(np.ones(TEXT_TOKENS, dtype=bool))
    infos = []
    for s in range(math.ceil(n / shard_size)):
        samples = []
        for i in range(min(shard_size, n - s * shard_size)):
            j = (s * shard_size + i) % pool
            caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 12))))
            fields = {"txt": caption.encode(), "latent.npy": latents[j]}
            if text_width:
                fields.update({"text_tokens.npy": tokens[j], "text_mask.npy": mask, "text_pooled.npy": pooled[j]})
            samples.append((f"s{s:04d}x{i:05d}", fields))
        path = folder / f"shard-{s:06d}.tar"
        write_tar_atomic(path, samples)
        infos.append(ShardInfo(str(path), len(samples)))
    write_manifest(folder, infos)


def prepare(args, work: Path) -> None:
    # one epoch holds every step: no loader restart inside the timed window
    text_width = TEXT[args.config][2] if args.config in TEXT else 0
    write_shards(work / "data", args.config, args.batch * (args.warmup + args.steps + 2), latent_side(args),
                 text_width)
    write_vae_export(work / "vae", args.config)
    if args.config in TEXT:
        write_text_checkpoint(work / "text.pt", TEXT[args.config][0])


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


# ---- memory per GPU, computed (no training) ---------------------------------------------------------------------
# bytes per parameter on each GPU for N GPUs: (fp32 weights, fp32 gradients, AdamW exp_avg + exp_avg_sq in fp32,
# the fp32 EMA copy, DeepSpeed's fp32 master-weight partition). ZeRO-1/2 clone the rank's partition of the (here
# already fp32) weights as the optimizer's master copy; ZeRO-3 reuses fp32 weights as they are. ZeRO-3 keeps
# parameters of at most 1e5 elements whole on every rank (persistent), the EMA's too: `persistent` counts them.
MEMORY_RULES = {
    "ddp": lambda n: (4, 4, 8, 4, 0),
    "deepspeed_stage_1": lambda n: (4, 4, 8 / n, 4, 4 / n),
    "deepspeed_stage_2": lambda n: (4, 4 / n, 8 / n, 4, 4 / n),
    "deepspeed_stage_3": lambda n: (4 / n, 4 / n, 8 / n, 4 / n, 0),
    "fsdp": lambda n: (4 / n, 4 / n, 8 / n, 4 / n, 0),
}


def memory_rows(params: int, persistent: int, gpus=(1, 8, 64)) -> list[tuple[str, int, list[float]]]:
    """(strategy, N, [weights, grads, Adam, EMA, DeepSpeed master, total] in bytes per GPU)."""
    rows = []
    for strategy, rule in MEMORY_RULES.items():
        for n in gpus:
            w, g, a, e, m = (b * params for b in rule(n))
            if strategy == "deepspeed_stage_3":  # persistent parameters (and their averages) whole on every rank
                w, e = w + 4 * persistent * (1 - 1 / n), e + 4 * persistent * (1 - 1 / n)
            rows.append((strategy, n, [w, g, a, e, m, w + g + a + e + m]))
    return rows


def activation_bytes(cfg, side: int, batch: int, tokens: int = TEXT_TOKENS) -> int:
    """Bytes the UNet's forward saves for backward at ``batch`` (fp32, CPU): every distinct storage the autograd
    graph keeps (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded. The weights are zeros (built on
    the meta device, then allocated): the sizes of what is saved do not depend on the values."""
    from hydra.utils import instantiate
    with torch.device("meta"):
        unet = instantiate(cfg.model.denoiser)
    unet = unet.to_empty(device="cpu").train()
    for p in unet.parameters():
        p.data.zero_()
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and t.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, unet.in_channels, side, side)
    context = torch.randn(batch, tokens, unet.context_dim)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, torch.randint(0, 1000, (batch,)), context=context, context_mask=mask)
    del out
    return sum(saved.values())


def print_memory_table(args, cfg, params: int, persistent: int) -> None:
    gib = 2**30
    print(f"{args.config} UNet: {params:,} parameters ({persistent:,} in parameters of <= 1e5 elements, whole on "
          f"every rank under ZeRO-3); per GPU, COMPUTED, GiB (2^30 bytes):")
    print("| strategy | GPUs | fp32 weights | fp32 grads | AdamW states | fp32 EMA | DeepSpeed fp32 master | total |")
    print("|---|---|---|---|---|---|---|---|")
    for strategy, n, values in memory_rows(params, persistent):
        print(f"| {strategy} | {n} | " + " | ".join(f"{v / gib:.2f}" for v in values) + " |")
    if args.activations:
        side = latent_side(args)
        t0 = time.perf_counter()
        one, two = (activation_bytes(cfg, side, b) for b in (1, 2))
        print(f"activations saved for backward, fp32 on the CPU, {side}x{side}x4 latents, {TEXT_TOKENS}-token "
              f"context: batch 1 {one / gib:.3f} GiB, batch 2 {two / gib:.3f} GiB -> {(two - one) / gib:.3f} GiB "
              f"per image ({time.perf_counter() - t0:.0f} s)")


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
        # buffers and fails on channels_last ones, and FSDP2 re-lays parameters out as contiguous dim-0 shards, so
        # under those only the inputs (and so the activations, which cuDNN keeps in the input's layout) are
        # channels_last
        self.layout = "nchw"
        if self.channels_last:
            self.layout = "channels_last"
            if re.search(r"DeepSpeed|ModelParallel|FSDP", type(trainer.strategy).__name__):
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
            "first_step_s": self.ends[0] - self.starts[0],  # a compiled run's compile is in here
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


def timer_overrides(args, result: Path, switches: str) -> tuple[str, ...]:
    # the child runs this file as a script: `__main__.StepTimer`, which Hydra finds in sys.modules
    channels_last = "channels_last" in switches.split("+")
    return (f"+callbacks.throughput._target_={__name__}.StepTimer", f"+callbacks.throughput.warmup={args.warmup}",
            f"+callbacks.throughput.steps={args.steps}", f"+callbacks.throughput.result={result}",
            f"+callbacks.throughput.channels_last={str(channels_last).lower()}")


def child(args, work: Path) -> None:
    from t2i.cli.train import train
    switches = args.switches[0]
    result = work / f"{run_id(args.child, switches)}.json"
    cfg = compose(args, work, args.child, switches, timer_overrides(args, result, switches))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    raise SystemExit(f"training ended after fewer than {args.warmup + args.steps + 1} batches")


# ---- the parent: data, FLOPs, one subprocess per run, the table -------------------------------------------
def run_child(args, work: Path, strategy: str, switches: str, timeout: float) -> dict:
    if timeout < 30:
        return {"ok": False, "error": f"skipped: {max(timeout, 0):.0f} s of --budget left"}
    if strategy.startswith("deepspeed") and not args.device.startswith("cuda") \
            and os.environ.get("DS_ACCELERATOR") != "cpu":
        return {"ok": False, "error": "skipped: DeepSpeed needs CUDA (DS_ACCELERATOR=cpu runs ZeRO on the CPU)"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", strategy, "--switches", switches,
           "--workdir", str(work), "--config", args.config, "--device", args.device, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--workers", str(args.workers),
           "--head-channels", str(args.head_channels)]
    cmd += ["--side", str(args.side)] if args.side else []
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += [f"--override={o}" for o in args.override]
    name = run_id(strategy, switches)
    log = work / f"{name}.log"
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
        try:  # what the child leaves behind when it exits at once (loader workers, compile workers)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    wall = time.perf_counter() - start
    if args.verbose or code != 0:
        tail = log.read_text(errors="replace").splitlines()[-40 if code != 0 else None:]
        print(f"---- {strategy} {switches} (exit {code}, {wall:.0f} s): {log}", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    result_file = work / f"{name}.json"
    if code == 0 and result_file.is_file():
        return {**json.loads(result_file.read_text()), "wall_s": wall}
    if code is None:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln.removeprefix("[rank0]: ").strip() for ln in log.read_text(errors="replace").splitlines()]
    errors = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception)\b", ln)]
    last = (errors or [ln for ln in lines if ln] or ["no output"])[-1]
    return {"ok": False, "error": f"exit {code}: {last[:200]}"}


def config_label(args) -> str:
    if args.config == "tiny":
        return "tiny"
    return args.config if (args.config == "sd" and args.side == 256) else f"{args.config} {args.side}px"


def row_label(strategy: str, switches: str, several: bool) -> str:
    """A run's name in the JSON record: the strategy, and its switch set when the call swept several."""
    return f"{strategy} {switches}" if several else strategy


def write_json(args, argv: list[str] | None, rows: list[tuple[str, str, dict]], peak: float | None,
               per_image: float, fwd: float, params: int) -> None:
    """The table as a JSON record: "<row>: <column>" figures, <row> the strategy (and the switch set when several
    were swept; a single non-plain set goes into the variant); a run that did not run: its images/s null, the
    reason in the note."""
    from report_record import write_record  # benchmarks/report_record.py (this folder is on sys.path)
    figures = {"UNet params": {"value": params, "unit": "params"},
               "UNet GFLOP/image, forward": {"value": fwd / args.batch / 1e9, "unit": "GFLOP"},
               "peak TFLOP/s (bf16 dense)": {"value": peak and peak / 1e12, "unit": "TFLOP/s",
                                             **({} if peak else {"note": "unknown device: no MFU"})}}
    several = len(args.switches) > 1
    for strategy, switches, r in rows:
        label = row_label(strategy, switches, several)
        if not r.get("ok"):
            figures[f"{label}: images/s"] = {"value": None, "unit": "images/s", "note": r["error"]}
            continue
        images = r["global_batch"] / r["iter_s"]
        mem = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else None
        figures.update({
            f"{label}: global batch": {"value": r["global_batch"], "unit": "images"},
            f"{label}: images/s": {"value": images, "unit": "images/s"},
            f"{label}: step": {"value": 1000 * r["iter_s"], "unit": "ms"},
            f"{label}: in-step": {"value": 1000 * r["step_s"], "unit": "ms"},
            f"{label}: peak mem": {"value": mem, "unit": "GiB"},
            f"{label}: GFLOP/image": {"value": per_image / 1e9, "unit": "GFLOP"},
            f"{label}: TFLOP/s": {"value": per_image * images / 1e12, "unit": "TFLOP/s"},
            f"{label}: MFU": {"value": 100 * per_image * images / peak if peak else None, "unit": "%"},
            f"{label}: precision": {"value": r["precision"], "unit": ""},
            f"{label}: layout": {"value": r["layout"], "unit": ""},
        })
    variant = f"{config_label(args)}, batch {args.batch}"
    if not several and args.switches[0] != "plain":
        variant += f", {args.switches[0].replace('+', ', ')}"
    variant += f", {args.tag}" if args.tag else ""
    write_record(args.json, "train_throughput", variant, args, figures,
                 "cuda" if args.device.startswith("cuda") else "cpu",
                 script=__file__, argv=argv)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def dry_run(args, work: Path, runs: list[tuple[str, str]]) -> int:
    """Compose every run's config (as its child would, the timing callback included) and print what the switches
    set, the UNet's parameters and FLOPs; nothing is written, built or trained. Returns how many runs failed."""
    from omegaconf import OmegaConf
    failed = 0
    for strategy, switches in runs:
        try:
            cfg = compose(args, work, strategy, switches, timer_overrides(args, work / "x.json", switches))
        except Exception as e:  # noqa: BLE001 - reported per run
            failed += 1
            print(f"  {strategy} [{switches}]: compose FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        d, te = cfg.model.denoiser, cfg.model.get("text_encoder") or {}
        print(f"  {strategy} [{switches}]: strategy {OmegaConf.select(cfg, 'strategy._target_', default=cfg.strategy)}; "
              f"compile.scope {(cfg.get('compile') or {}).get('scope')}; "
              f"optimizer fused {cfg.model.optimizer.get('fused', False)}; "
              f"gradient_checkpointing {d.gradient_checkpointing}; "
              f"channels_last {cfg.callbacks.throughput.channels_last}; batch {cfg.data.batch_size}; "
              f"precision {cfg.trainer.precision}; text {te.get('arch')}/{te.get('layer')}; UNet context_dim "
              f"{d.context_dim}, head channels {d.num_head_channels}, linear {d.use_linear_projection}")
    cfg = compose(args, work, "auto")
    fwd, total, params = count_flops(cfg, args.batch, latent_side(args))
    print(f"UNet {params:,} params; GFLOP/image fwd {fwd / args.batch / 1e9:.4g}, fwd+bwd {total / args.batch / 1e9:.4g}"
          f" at {latent_side(args)}x{latent_side(args)}x4 latents, batch {args.batch}; {failed} run(s) failed to compose")
    return failed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sd", "sd2"], default="tiny")
    p.add_argument("--side", type=int, choices=[256, 512], default=None,
                   help="sd, sd2: image side (latents side/8; default 256)")
    p.add_argument("--strategy", nargs="+", default=["ddp"], choices=STRATEGIES)
    p.add_argument("--switches", nargs="+", default=["plain"],
                   help="switch sets, one row per strategy and set, names joined with '+' (e.g. "
                        "channels_last+fused+compile): " + "; ".join(f"{k}: {v}" for k, v in SWITCHES.items()))
    p.add_argument("--batch", type=int, default=None,
                   help="per-device batch (default: tiny 64, sd 32 / 8, sd2 64 / 16 at 256 / 512)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--channels-last", action="store_true", help="add channels_last to every switch set")
    p.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on cuda, 32-true on cpu)")
    p.add_argument("--head-channels", type=int, default=64, help="sd: channels per attention head; 0: 8 heads")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: cuda 2, cpu 0)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from its name)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole call: a run gets at most what is left (under 30 s: skipped)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--workdir", default=None, help="keep data and logs here (default: a temp dir, removed)")
    p.add_argument("--verbose", action="store_true", help="print each run's log")
    p.add_argument("--dry-run", action="store_true", help="compose each run's config and count FLOPs; no training")
    p.add_argument("--memory-table", action="store_true",
                   help="print the computed per-GPU memory of weights, gradients, AdamW and EMA; no training")
    p.add_argument("--activations", action="store_true",
                   help="with --memory-table: measure the activations saved per image on the CPU (fp32)")
    p.add_argument("--json", default=None, help="also write the figures as JSON: a .json file, or a folder "
                   "that gets <name>-<machine>.json (benchmarks/report.py)")
    p.add_argument("--tag", default=None, help="appended to the JSON record's variant (and so its file name), "
                   "to tell apart two calls at the same config and batch")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config == "tiny" and args.side:
        p.error("--side is for --config sd and sd2 (tiny: 32px images, 8x8 latents)")
    args.side = None if args.config == "tiny" else (args.side or 256)
    args.batch = args.batch or DEFAULT_BATCH[(args.config, args.side)]
    args.workers = args.workers if args.workers is not None else (2 if args.device.startswith("cuda") else 0)
    try:
        args.switches = list(dict.fromkeys(parse_switches(s, args.channels_last) for s in args.switches))
    except ValueError as e:
        p.error(str(e))
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.child:
        child(args, Path(args.workdir))
        return
    runs = [(strategy, switches) for strategy in args.strategy for switches in args.switches]

    if args.dry_run or args.memory_table:
        work = Path(args.workdir or tempfile.gettempdir()) / "t2i-throughput-dry-run"  # named, never written
        if args.dry_run:
            print(f"{config_label(args)}: {len(runs)} run(s), batch {args.batch}/device")
            failed = dry_run(args, work, runs)
        if args.memory_table:
            cfg = compose(args, work, "auto")
            from hydra.utils import instantiate
            with torch.device("meta"):
                unet = instantiate(cfg.model.denoiser)
            params = sum(q.numel() for q in unet.parameters())
            persistent = sum(q.numel() for q in unet.parameters() if q.numel() <= 100_000)
            print_memory_table(args, cfg, params, persistent)
        if args.dry_run and failed:
            raise SystemExit(1)
        return

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="t2i-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        prepare(args, work)
        side = latent_side(args)
        fwd, total, params = count_flops(compose(args, work, "auto"), args.batch, side)
        per_image = total / args.batch
        print(f"{config_label(args)} LDM stage: UNet {params:,} params, {side}x{side}x4 latents, batch "
              f"{args.batch}/device, {args.steps} timed steps after {args.warmup}, switch sets "
              f"{', '.join(args.switches)}; UNet GFLOP/image fwd {fwd / args.batch / 1e9:.4g}, "
              f"fwd+bwd {per_image / 1e9:.4g} (data ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        rows, device = [], None
        for strategy, switches in runs:
            left = args.budget - (time.perf_counter() - t0) if args.budget else math.inf
            r = run_child(args, work, strategy, switches, min(args.timeout, left))
            shutil.rmtree(work / "runs" / run_id(strategy, switches), ignore_errors=True)
            rows.append((strategy, switches, r))
            device = device or r.get("device")
            status = f"{r['wall_s']:.0f} s (first step {r['first_step_s']:.1f} s)" if r.get("ok") else r["error"]
            print(f"  {strategy} [{switches}]: {status}", flush=True)
        peak = peak_flops(device or "", args.peak_tflops)
        print(f"\ndevice: {device or 'n/a'}; peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s "
              f"(bf16 dense){' from --peak-tflops' if args.peak_tflops else ''}; {config_label(args)}, batch "
              f"{args.batch}/device")
        print("| strategy | switches | global batch | images/s | step ms | in-step ms | peak mem GiB | GFLOP/image "
              "| TFLOP/s | MFU | precision | layout |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for strategy, switches, r in rows:
            if not r.get("ok"):
                print(f"| {strategy} | {switches} | {args.batch} | - | - | - | - | {per_image / 1e9:.4g} | - | - | - "
                      f"| {r['error']} |")
                continue
            images = r["global_batch"] / r["iter_s"]
            achieved = per_image * images
            mem = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else None
            mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
            print(f"| {strategy} | {switches} | {r['global_batch']} | {images:.1f} | {1000 * r['iter_s']:.1f} | "
                  f"{1000 * r['step_s']:.1f} | {fmt(mem, '.2f')} | {per_image / 1e9:.4g} | {achieved / 1e12:.3g} | "
                  f"{mfu} | {r['precision']} | {r['layout']} |")
        if args.json:
            write_json(args, argv, rows, peak, per_image, fwd, params)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
