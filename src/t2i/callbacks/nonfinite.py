"""Non-finite gradients: skip the optimizer step, count it, and stop with a clear error after K in a row.

Checked in ``on_before_optimizer_step``, after backward (and, under DDP, after the all-reduce, so every rank
sees the same gradients and skips together) and before gradient clipping. Skipping sets every gradient to
None: PyTorch optimizers then leave the parameters and their moments untouched. A NaN or Inf loss makes
non-finite gradients, so it is caught here too. The weights never take a non-finite update, so checkpoints
stay good.

A skipped step changes nothing that training carries forward: stages that mix in `SkippedStepsAware` do not
advance their LR schedule on it, and the diffusion stage's EMA does not update (`optimizer_step_skipped`
tells them). What it does change: the global step and the data position advance (the bad batch is consumed,
and ``max_steps`` counts it), and the count of skipped steps goes up.

Under DeepSpeed the gradients live in DeepSpeed's partitioned buffers, not in ``param.grad``; there the guard
watches the loss instead (counted, and the run stops after K in a row), but cannot skip the update.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger("t2i.nonfinite")


class NonFiniteGradientsError(RuntimeError):
    pass


def all_finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class NonFiniteGuard(L.Callback):
    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # in the whole run (kept in checkpoints)
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.step_skipped = False  # the optimizer step being taken now was skipped (read by the stages)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, finite: bool, what: str) -> None:
        if finite:
            self.consecutive, self.first_bad_step = 0, None
            return
        self.skipped += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = trainer.global_step
        log.warning("step %d: non-finite %s (%d in a row, %d in the run)", trainer.global_step, what,
                    self.consecutive, self.skipped)
        pl_module.log("train/nonfinite_steps", float(self.skipped), rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteGradientsError(
                f"{self.consecutive} optimizer steps in a row (from step {self.first_bad_step} to "
                f"{trainer.global_step}) had non-finite {what}; the run is diverging. The last checkpoint holds "
                f"finite weights: resume from it with a lower learning rate, stronger gradient clipping or "
                f"another precision, and check the data of these steps.")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if _is_deepspeed(trainer):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if any(isinstance(g, DTensor) for g in grads):  # FSDP: each rank holds a shard; all must skip together
            local = all_finite([g.to_local() if isinstance(g, DTensor) else g for g in grads])
            bad = torch.tensor(float(not local), device=pl_module.device)
            finite = bool(trainer.strategy.reduce(bad, reduce_op="sum") == 0)
        else:
            finite = all_finite(grads)
        self.step_skipped = not finite
        if not finite:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # the optimizer skips parameters without a gradient
        self._record(trainer, pl_module, finite, "gradients (step skipped)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not _is_deepspeed(trainer):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            bad = torch.tensor(float(not torch.isfinite(loss).all()), device=loss.device)
            self._record(trainer, pl_module, bool(trainer.strategy.reduce(bad, reduce_op="sum") == 0), "loss")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.first_bad_step = state["first_bad_step"]


def optimizer_step_skipped(trainer: L.Trainer | None) -> bool:
    """Whether a `NonFiniteGuard` skipped the optimizer step being taken (from its gradient check until the next
    step's); False without a trainer or a guard."""
    callbacks = getattr(trainer, "callbacks", None) or []
    return any(c.step_skipped for c in callbacks if isinstance(c, NonFiniteGuard))


class SkippedStepsAware:
    """LightningModule mixin (put it before ``L.LightningModule``): the LR schedule does not advance on an
    optimizer step that `NonFiniteGuard` skipped, so a warm-up or decay is not eaten by bad batches."""

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if optimizer_step_skipped(getattr(self, "_trainer", None)):
            return
        super().lr_scheduler_step(scheduler, metric)


def _is_deepspeed(trainer: L.Trainer) -> bool:
    return type(trainer.strategy).__name__.endswith("DeepSpeedStrategy")
