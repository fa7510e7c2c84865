"""Train one stage: ``python -m t2i.cli.train experiment=tiny/vae [key=value ...]``.

Every Trainer flag is an override (``trainer.max_steps=100``, ``trainer.fast_dev_run=true``);
``ckpt_path=last`` resumes from ``<run_dir>/checkpoints/last.ckpt`` when it exists (its previous version when
it is damaged). At the end the stage writes ``last.ckpt`` and its export (``<run_dir>/export``). A SIGTERM or
SIGUSR1 saves ``last.ckpt`` at the next step boundary and exits with 128 + the signal number.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from t2i.bf16_precision import BF16MixedPrecision, autocast_device
from t2i.callbacks.final_checkpoint import FinalCheckpoint
from t2i.callbacks.preemption import Preempted, PreemptionCheckpoint
from t2i.callbacks.rng_state import RngStateCallback
from t2i.callbacks.stage_tag import StageTag
from t2i.callbacks.step_timing import StepTiming
from t2i.checkpoint_files import checkpoint_problem
from t2i.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    check_stage_tag,
    choose_resume_checkpoint,
)
from t2i.cli.batch import apply_global_batch
from t2i.cli.config import check_moved_keys, config_dir
from t2i.distributed.fsdp import FSDP2Strategy
from t2i.exports import write_export
from t2i.nn.compile import compile_from_config

log = logging.getLogger("t2i.train")

RUN_CONFIG = "config.yaml"  # the resolved config of a run, in its run_dir (read by t2i.cli.export)


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path
    export_dir: Path | None
    metrics: dict


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = choose_resume_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        if last is None:
            log.info("ckpt_path=last but %s has no checkpoint: starting from scratch", run_dir / "checkpoints")
        return str(last) if last else None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    problem = checkpoint_problem(ckpt_path)
    if problem:
        raise CheckpointError(f"cannot resume from {ckpt_path}: {problem}")
    return ckpt_path


def check_zero_world_size(ckpt_path: str, world_size: int) -> None:
    """A DeepSpeed ZeRO checkpoint folder holds its model and optimizer states partitioned over the ranks that
    wrote it. t2i resumes it on as many ranks only (DDP and single-device checkpoints resume on any number: the
    data stream spreads the rest of the epoch over the new ranks)."""
    folder = Path(ckpt_path) / "checkpoint"
    if not folder.is_dir():
        return
    saved = len(list(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")))
    if saved and saved != world_size:
        raise CheckpointError(f"cannot resume from {ckpt_path}: it is a DeepSpeed ZeRO checkpoint partitioned over "
                              f"{saved} ranks and this run has {world_size}. Resume it on {saved} ranks, or "
                              f"consolidate it with DeepSpeed's zero_to_fp32.py and start a run from the weights")


def _float_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))
            and (not isinstance(v, torch.Tensor) or v.numel() == 1)}


def is_deepspeed(strategy) -> bool:
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return "DeepSpeed" in target or "deepspeed" in target


def shards_parameters(strategy) -> bool:
    """DeepSpeed or FSDP (a Trainer's strategy): parameters flattened or sharded across ranks, and checkpoints
    written as folders by every rank."""
    return isinstance(strategy, (DeepSpeedStrategy, FSDP2Strategy))


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    # StepTiming's progress.json is what the recipe runner estimates the job's duration from
    callbacks += [RngStateCallback(cfg.seed), StageTag(), FinalCheckpoint(last), StepTiming()]
    if not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
        callbacks.append(PreemptionCheckpoint(str(last)))
    if cfg.trainer.get("enable_progress_bar", True) is not False and \
            not any(isinstance(c, ProgressBar) for c in callbacks):
        # Lightning picks its rich bar whenever `rich` happens to be installed (another package may bring it);
        # the tqdm bar reads the same in a terminal and in a cluster job's log file
        callbacks.append(TQDMProgressBar())
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg is not None] or False
    plugins = [] if is_deepspeed(cfg.strategy) else [AtomicCheckpointIO()]  # DeepSpeed swaps its directories
    extra = {}
    if str(cfg.trainer.get("precision")) == "bf16-mixed" and not is_deepspeed(cfg.strategy):
        # Lightning's own bf16 plugin refuses to clip gradients for a fused optimizer (an fp16 concern)
        plugins.append(BF16MixedPrecision(autocast_device(cfg.trainer.get("accelerator"))))
        extra["precision"] = None
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins,
                       default_root_dir=str(run_dir), **extra)


def _export(cfg: DictConfig, trainer: L.Trainer, model, datamodule, metrics: dict, last: Path) -> Path | None:
    if shards_parameters(trainer.strategy):  # every rank must be done writing; rank 0 converts the folder
        trainer.strategy.barrier("t2i-export")
        if not trainer.is_global_zero:
            return None
        from t2i.cli.export import export_from_checkpoint  # builds the model on the CPU from the run config
        return export_from_checkpoint(OmegaConf.to_container(cfg, resolve=True), last, cfg.export_dir,
                                      metrics=metrics, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    metrics.update(model.export_metrics(datamodule) if hasattr(model, "export_metrics") else {})
    return write_export(cfg.export_dir, model.stage_name, model.export_state_dict(),
                        OmegaConf.to_container(cfg, resolve=True), metrics=metrics,
                        parents=dict(cfg.get("parents") or {}), extra={"global_step": trainer.global_step})


def train(cfg: DictConfig) -> TrainResult:
    """Fit the configured stage, save ``last.ckpt``, validate, and write the stage export."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # missing or empty shard lists fail here, before any model is built
    trainer = build_trainer(cfg, run_dir)
    cfg = apply_global_batch(cfg, trainer)  # accumulation for a fixed global batch; LR scaled when asked
    model = instantiate(cfg.model)  # a bad value fails here, before the run folder's config is replaced
    if cfg.get("channels_last", False):  # 4-D weights only; the convolutions then keep activations NHWC
        if shards_parameters(trainer.strategy):
            # ZeRO and FSDP flatten or shard parameters as contiguous tensors and refuse NHWC-strided ones
            log.warning("channels_last is not applied under this strategy (ZeRO and FSDP shard parameters as "
                        "contiguous tensors)")
        else:
            model = model.to(memory_format=torch.channels_last)
    compile_from_config(model, cfg.get("compile"), shapes=len(getattr(datamodule, "buckets", None) or ()) or 1)
    if trainer.accumulate_grad_batches > 1 and not model.automatic_optimization:
        raise ValueError(f"gradient accumulation ({trainer.accumulate_grad_batches} batches per step, from "
                         f"global_batch_size or trainer.accumulate_grad_batches) is not supported by the "
                         f"{model.stage_name!r} stage, which steps its optimizers itself (manual optimization); "
                         f"reach the global batch with data.batch_size and more devices instead")
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), run_dir)
    if ckpt:  # a damaged checkpoint or one of another stage fails here too: the run folder stays as it was
        check_stage_tag(ckpt, model)
        check_zero_world_size(ckpt, trainer.world_size)
    if trainer.is_global_zero:
        (run_dir / RUN_CONFIG).write_text(yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True),
                                                         sort_keys=False), encoding="utf-8")
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)  # a checkpoint never runs code
    except SIGTERMException:
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
        raise Preempted(preemption.received, preemption.path, trainer.global_step,
                        preemption.previous_handler) from None
    last = run_dir / "checkpoints" / "last.ckpt"  # written by FinalCheckpoint at the end of training
    metrics = _float_metrics(trainer.callback_metrics)
    if cfg.get("final_validation", True) and datamodule.val_data is not None and not trainer.fast_dev_run:
        metrics.update(_float_metrics(trainer.validate(model, datamodule=datamodule, verbose=False)[0]))
    export_dir = None
    if cfg.get("export", True):
        export_dir = _export(cfg, trainer, model, datamodule, metrics, last)
        if export_dir is not None:
            log.info("export written to %s", export_dir)
    return TrainResult(run_dir, last, export_dir, metrics)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        result = train(cfg)
    except Preempted as e:
        print(f"[t2i] {e}", flush=True)
        e.hand_over()  # submitit's handler requeues the job and exits here
        sys.exit(e.exit_code)
    print(f"[t2i] run: {result.run_dir}  export: {result.export_dir}")
    for k, v in sorted(result.metrics.items()):
        print(f"[t2i]   {k} = {v:.6g}")


if __name__ == "__main__":
    try:
        check_moved_keys(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"[t2i] {e}")
    main()
