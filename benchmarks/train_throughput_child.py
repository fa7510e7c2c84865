"""train_throughput's child process: one short training run under one strategy, clocked by the StepTimer
callback, which writes its figures and ends the process once the timed steps are done."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from train_throughput_setup import compose


# ---- the child: one training run ----------------------------------------------------------------------------
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
    timer = [f"+callbacks.throughput._target_={__name__}.StepTimer", f"+callbacks.throughput.warmup={args.warmup}",
             f"+callbacks.throughput.steps={args.steps}", f"+callbacks.throughput.result={result}",
             f"+callbacks.throughput.channels_last={str(args.channels_last).lower()}"]
    cfg = compose(args, work, args.child, tuple(timer))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    raise SystemExit(f"training ended after fewer than {args.warmup + args.steps + 1} batches")
