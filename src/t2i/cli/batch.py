"""The global batch: per-device batch x devices x nodes x gradient accumulation, fixed when asked.

``global_batch_size=G`` sets ``trainer.accumulate_grad_batches`` so that the global batch is exactly G on any
number of GPUs (an error when G is not a multiple of per-device batch x world size). ``lr_reference_batch=R``
scales every optimizer's learning rate linearly by G / R (the configured LR is the one tuned at global batch
R; LDM's ``scale_lr`` is the same rule with R = 1). The resulting global batch is printed at start.
"""

from __future__ import annotations

import logging

import lightning as L
from omegaconf import DictConfig, open_dict

log = logging.getLogger("t2i.batch")


def accumulation_for(global_batch: int, per_device: int, world: int) -> int:
    per_step = per_device * world
    if global_batch < per_step or global_batch % per_step:
        raise ValueError(f"global_batch_size={global_batch} is not a multiple of data.batch_size x world size = "
                         f"{per_device} x {world} = {per_step}; choose a global batch that is, or change "
                         f"data.batch_size")
    return global_batch // per_step


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    return lr * global_batch / reference_batch


def apply_global_batch(cfg: DictConfig, trainer: L.Trainer) -> DictConfig:
    """Set accumulation (and scale LRs) in `cfg` (in place; what the run records) from the config and the
    trainer's world size, and print the effective global batch."""
    world = int(trainer.num_nodes) * int(trainer.num_devices)
    per_device = int(cfg.data.batch_size)
    global_batch = cfg.get("global_batch_size")
    if global_batch is not None:
        accumulate = accumulation_for(int(global_batch), per_device, world)
        trainer.accumulate_grad_batches = accumulate
        with open_dict(cfg):
            cfg.trainer.accumulate_grad_batches = accumulate
    accumulate = int(trainer.accumulate_grad_batches)
    effective = per_device * world * accumulate
    message = (f"global batch {effective} = {per_device} per device x {world} devices x {accumulate} accumulation "
               f"steps")
    reference = cfg.get("lr_reference_batch")
    if reference is not None:
        if int(reference) < 1:
            raise ValueError(f"lr_reference_batch must be a positive batch size, got {reference}")
        scaled = []
        for name, node in (cfg.model or {}).items():
            if isinstance(node, DictConfig) and node.get("_partial_") and node.get("lr") is not None:
                old = float(node.lr)
                node.lr = scaled_lr(old, effective, int(reference))
                scaled.append(f"model.{name}.lr {old:g} -> {node.lr:g}")
        if not scaled:
            raise ValueError("lr_reference_batch is set but the model config has no optimizer with an lr to scale")
        message += f"; learning rates scaled by {effective}/{reference}: " + ", ".join(scaled)
    if trainer.is_global_zero:
        print(f"[t2i] {message}", flush=True)
    log.info(message)
    return cfg
