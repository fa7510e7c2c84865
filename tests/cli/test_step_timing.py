"""StepTiming: after the warm-up steps and `every` timed steps it writes <default_root_dir>/progress.json (global
step, max_steps, the median seconds per step, when), then every `every` steps and at the end; it leaves validation
out of the timing and training results unchanged."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from t2i.callbacks.step_timing import PROGRESS, StepTiming


class Tiny(L.LightningModule):
    """A linear model; validation sleeps `val_sleep` seconds so that timing it would show."""

    def __init__(self, val_sleep: float = 0.0):
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.val_sleep = val_sleep

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(torch.nn.functional.dropout(x, 0.5)).pow(2).mean()  # dropout: RNG use would show

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(0))), batch_size=4)


def fit(tmp_path, callbacks, max_steps: int = 6, val_sleep: float = 0.0, val_every: int | None = None) -> Tiny:
    L.seed_everything(0, verbose=False)
    model = Tiny(val_sleep)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=callbacks, num_sanity_val_steps=0, val_check_interval=val_every,
                        limit_val_batches=1 if val_every else 0)
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader() if val_every else None)
    return model


class ReadProgress(L.Callback):
    """The step progress.json holds after each training batch (None: no file yet)."""

    def __init__(self):
        self.seen: dict[int, int | None] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        path = StepTiming.path(trainer)
        self.seen[trainer.global_step] = json.loads(path.read_text())["step"] if path.exists() else None


def test_written_after_warmup_and_every_steps_then_every_steps_and_at_the_end(tmp_path):
    reader = ReadProgress()
    fit(tmp_path, [StepTiming(warmup=2, every=3), reader], max_steps=13)
    # clock starts at step 2; 3 steps timed at step 5; then 8, 11; the end writes step 13
    assert reader.seen == {1: None, 2: None, 3: None, 4: None, 5: 5, 6: 5, 7: 5, 8: 8, 9: 8, 10: 8, 11: 11,
                           12: 11, 13: 11}
    info = json.loads((tmp_path / PROGRESS).read_text())
    assert info["step"] == 13 and info["measured_steps"] == 11


def test_a_short_fit_writes_its_figure_at_the_end(tmp_path):
    started = time.time()
    fit(tmp_path, [StepTiming()])  # warm-up 5: the 6th step is the only timed one
    info = json.loads((tmp_path / PROGRESS).read_text())
    assert info["step"] == 6 and info["max_steps"] == 6 and info["measured_steps"] == 1
    assert 0 < info["step_seconds"] < 5
    assert started <= info["time"] <= time.time()
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_is_written_during_warmup(tmp_path):
    fit(tmp_path, [StepTiming(warmup=5)], max_steps=5)
    assert not (tmp_path / PROGRESS).exists()


def test_validation_is_not_timed(tmp_path):
    fit(tmp_path, [StepTiming(warmup=1, every=2)], max_steps=8, val_sleep=0.3, val_every=1)
    info = json.loads((tmp_path / PROGRESS).read_text())
    assert info["step"] == 8 and info["measured_steps"] == 7
    assert info["step_seconds"] < 0.15  # each step is followed by 0.3 s of validation


def test_training_results_are_unchanged(tmp_path):
    plain = fit(tmp_path / "plain", [])
    timed = fit(tmp_path / "timed", [StepTiming(warmup=1, every=1)])
    for a, b in zip(plain.parameters(), timed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="warmup"):
        StepTiming(every=0)
