"""NaN/Inf losses and gradients: `NonFiniteGuard` skips the optimizer step (weights and Adam moments untouched),
counts it (logged, and kept in checkpoints), lets finite steps train on as if the bad batch had not been there,
and stops with a clear error after K bad steps in a row, leaving a last checkpoint with finite weights."""

from __future__ import annotations

import copy
import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from t2i_testing import load_checkpoint, tiny_ldm_overrides, tiny_overrides
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from t2i.callbacks.nonfinite import NonFiniteGradientsError, NonFiniteGuard, SkippedStepsAware
from t2i.checkpointing import AtomicCheckpointIO
from t2i.cli.config import compose_config
from t2i.cli.train import train
from t2i.stages.lr import warmup_constant


class Regression(SkippedStepsAware, L.LightningModule):
    def __init__(self, warmup_steps: int = 0):
        super().__init__()
        self.warmup_steps = warmup_steps
        self.lin = nn.Linear(4, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, -0.4]]))
            self.lin.bias.fill_(0.05)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.lin(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.05)
        if not self.warmup_steps:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup_constant(opt, self.warmup_steps),
                                                   "interval": "step"}}


def make_batches(n: int, bad: dict[int, float] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of 8 samples (y = sum of x); batch i of `bad` gets that value (nan or inf) in one input."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        x = torch.randn(8, 4, generator=g)
        y = x.sum(1, keepdim=True)
        if bad and i in bad:
            x[3, 1] = bad[i]
        batches.append((x, y))
    return batches


class Snapshots(L.Callback):
    """Weights and Adam state after every batch."""

    def __init__(self):
        self.weights, self.adam = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.adam.append(copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))


def fit(batches, tmp_path, *callbacks, max_consecutive: int = 3, ckpt_path=None, max_epochs: int = 1,
        model: Regression | None = None):
    guard, snaps = NonFiniteGuard(max_consecutive), Snapshots()
    model = model or Regression()
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="logs"),
                        log_every_n_steps=1, callbacks=[guard, snaps, *callbacks], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                            for c in callbacks),
                        plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer, model, guard, snaps


def _assert_same_adam(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[i][name], b[i][name]), f"param {i} {name}"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_bad_batch_is_skipped_counted_and_training_goes_on(value, tmp_path):
    trainer, model, guard, snaps = fit(make_batches(6, bad={2: value}), tmp_path / "run")
    assert trainer.global_step == 6
    assert (guard.skipped, guard.consecutive) == (1, 0)
    # the bad step left weights and Adam's moments (and step count) exactly as they were
    for k, v in snaps.weights[2].items():
        assert torch.equal(v, snaps.weights[1][k]), k
    _assert_same_adam(snaps.adam[2], snaps.adam[1])
    # the finite steps around it trained, and ended exactly where a run without the bad batch ends
    for k in snaps.weights[3]:
        assert not torch.equal(snaps.weights[3][k], snaps.weights[2][k]), f"step 3 did not train {k}"
    _, ref_model, ref_guard, ref_snaps = fit([b for i, b in enumerate(make_batches(6)) if i != 2], tmp_path / "ref")
    assert ref_guard.skipped == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_model.state_dict()[k]), k
    _assert_same_adam(snaps.adam[-1], ref_snaps.adam[-1])
    # the count is logged from the bad step on (Lightning repeats a hook's last logged value on later steps)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        logged = [(int(r["step"]), float(r["train/nonfinite_steps"])) for r in csv.DictReader(f)
                  if r.get("train/nonfinite_steps")]
    assert logged[0] == (2, 1.0) and {v for _, v in logged} == {1.0}


def test_a_skipped_step_does_not_advance_the_lr_warm_up(tmp_path):
    """With a warm-up schedule, the run with a bad batch ends bit-equal to the run without it: the skipped step
    neither moved the weights nor took a step of the schedule."""
    trainer, model, guard, _ = fit(make_batches(6, bad={2: math.nan}), tmp_path / "run",
                                   model=Regression(warmup_steps=4))
    ref_trainer, ref_model, _, _ = fit([b for i, b in enumerate(make_batches(6)) if i != 2], tmp_path / "ref",
                                       model=Regression(warmup_steps=4))
    assert guard.skipped == 1 and trainer.global_step == 6
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert trainer.optimizers[0].param_groups[0]["lr"] == ref_trainer.optimizers[0].param_groups[0]["lr"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_model.state_dict()[k]), k


def test_a_skipped_step_leaves_a_diffusion_stage_ema_and_schedule_alone(small_shapes, tiny_vae_export, tmp_path):
    """The tiny LDM (EMA with warm-up, warm-up LR schedule), 4 steps, step 1's gradients made NaN: 3 EMA updates
    and 3 schedule steps (the global step still counts 4)."""
    run = tmp_path / "run"
    train(compose_config(tiny_ldm_overrides(
        small_shapes, tiny_vae_export, run, "trainer.max_steps=4", "final_validation=false", "export=false",
        "trainer.precision=32-true", "+callbacks.poison._target_=t2i_testing.PoisonGradients",
        "+callbacks.poison.steps=[1]")))
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["callbacks"]["NonFiniteGuard"]["skipped"] == 1
    assert int(last["state_dict"]["ema.num_updates"]) == 3
    assert last["lr_schedulers"][0]["last_epoch"] == 3


def test_the_count_survives_a_checkpoint_round_trip(tmp_path):
    batches = make_batches(5, bad={1: math.nan})
    trainer = fit(batches, tmp_path / "run")[0]
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    state = load_checkpoint(path)["callbacks"]["NonFiniteGuard"]
    assert state == {"skipped": 1, "consecutive": 0, "first_bad_step": None}
    # resume for a second epoch over the same data (one more bad batch): the count goes on from 1
    trainer, _, guard, _ = fit(batches, tmp_path / "run", ckpt_path=path, max_epochs=2)
    assert trainer.global_step == 10 and guard.skipped == 2


def test_k_bad_steps_in_a_row_stop_the_run_and_the_last_checkpoint_is_finite(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    every_step = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True, save_top_k=0)
    with pytest.raises(NonFiniteGradientsError) as err:
        fit(make_batches(8, bad={2: math.nan, 3: math.inf, 4: math.nan}), tmp_path, every_step)
    message = str(err.value)
    assert "3 optimizer steps in a row (from step 2 to 4)" in message and "non-finite gradients" in message
    last = load_checkpoint(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 4  # written after the 2nd bad step; the 3rd raised before its save
    assert last["callbacks"]["NonFiniteGuard"]["consecutive"] == 2
    weights = last["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    # ... and they are the weights of the last good step (step 2: batches 0 and 1)
    good = fit(make_batches(2), tmp_path / "good")[1].state_dict()
    for k, v in weights.items():
        assert torch.equal(v, good[k]), k


def test_the_guard_is_wired_into_train(small_shapes, tmp_path):
    """The tiny VAE (manual optimization) with a NaN loss: every step skipped, stopped after K=3, last.ckpt
    finite."""
    run = tmp_path / "run"
    with pytest.raises(NonFiniteGradientsError, match=r"3 optimizer steps in a row \(from step 0 to 2\)"):
        train(compose_config(tiny_overrides(small_shapes, run, "trainer.max_steps=10", "model.kl_weight=nan",
                                            "callbacks.nonfinite_guard.max_consecutive=3",
                                            "callbacks.checkpoint.every_n_train_steps=1", "final_validation=false",
                                            "export=false", "model.grid_every_n_steps=0")))
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    prev = load_checkpoint(run / "checkpoints" / "last.ckpt.prev")
    assert (last["global_step"], prev["global_step"]) == (2, 1)
    for k, v in last["state_dict"].items():
        assert torch.isfinite(v).all() and torch.equal(v, prev["state_dict"][k]), k
    assert last["callbacks"]["NonFiniteGuard"]["skipped"] == 2
