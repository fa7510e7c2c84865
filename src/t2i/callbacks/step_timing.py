"""Measure how long a training step takes on this machine and write it to ``<default_root_dir>/progress.json``,
which the recipe runner (`t2i.cli.recipe`) reads to estimate when the whole job will be done.

The file holds ``{"step", "max_steps", "step_seconds", "measured_steps", "time"}``: the trainer's global step,
its ``max_steps``, the median wall seconds per global step over the steps timed so far (the latest `window`
of them), how many steps that median is over, and when it was written (``time.time()``). A "step" is what
``global_step`` and ``max_steps`` count, so that ``(max_steps - step) * step_seconds`` is the time left,
whatever the stage's optimizers do.

The first `warmup` steps of a fit (and of a resumed fit) are not timed: they hold data-loader start-up, lazy
initialisation and allocator warm-up. Validation is not timed either: the clock restarts when it ends. The file
is first written once `every` steps have been timed (one step's time alone can be far off on a busy
machine), then every `every` steps, and when training ends. Only clocks are read, never a random-number
generator, so a run's results are the same with or without it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from pathlib import Path

import lightning as L

PROGRESS = "progress.json"


class StepTiming(L.Callback):
    def __init__(self, warmup: int = 5, every: int = 10, window: int = 10_000):
        if warmup < 0 or not 1 <= every <= window:
            raise ValueError(f"need warmup >= 0 and 1 <= every <= window, got warmup={warmup}, every={every}, "
                             f"window={window}")
        self.warmup, self.every = warmup, every
        # per-step durations of the latest `window` timed steps: a median over them stays cheap on long runs
        self.durations: deque[float] = deque(maxlen=window)
        self._start_step = 0
        self._last_step: int | None = None  # the global step when the clock last started
        self._last_time = 0.0
        self._written_step: int | None = None

    @staticmethod
    def path(trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / PROGRESS

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.durations.clear()
        self._start_step = trainer.global_step
        self._last_step, self._written_step = None, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        now, step = time.perf_counter(), trainer.global_step
        if step - self._start_step < self.warmup:
            return
        if self._last_step is None:  # warm-up done: the clock starts here
            self._last_step, self._last_time = step, now
            return
        if step == self._last_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self.durations.append((now - self._last_time) / (step - self._last_step))
        self._last_step, self._last_time = step, now
        timed_enough = len(self.durations) >= self.every
        if timed_enough and (self._written_step is None or step - self._written_step >= self.every):
            self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step is not None:
            self._last_step, self._last_time = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.durations and self._written_step != trainer.global_step:
            self._write(trainer)  # the final figure, over every timed step

    def _write(self, trainer: L.Trainer) -> None:
        info = {"step": trainer.global_step, "max_steps": trainer.max_steps,
                "step_seconds": statistics.median(self.durations), "measured_steps": len(self.durations),
                "time": time.time()}
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")  # a reader never sees half a file
        tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self._written_step = trainer.global_step
