"""Pre-emption: on SIGTERM or SIGUSR1, finish the current step, save ``last.ckpt`` and exit (requeueing the SLURM
job when asked), so a resumed run (``ckpt_path=last``) continues exactly where this one stopped.

Lightning turns SIGTERM into a `SIGTERMException` at the next step boundary, agreed across ranks (rank 0's
flag is broadcast each step). SIGUSR1 (what ``sbatch --signal=USR1@120`` sends before the time limit) is routed
into the same flag, replacing Lightning's SLURM handler, which saves an ``hpc_ckpt`` from inside the signal
handler, i.e. possibly in the middle of a step. The checkpoint is written from ``on_exception``, while the loops
and the data position still exist.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("t2i.preemption")


class Preempted(RuntimeError):
    """Training stopped on a pre-emption signal after saving its checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        super().__init__(f"pre-empted by {signal.Signals(signum).name} at step {step}: saved {checkpoint}; "
                         f"resume with ckpt_path=last")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PreemptionCheckpoint(L.Callback):
    def __init__(self, path: str, signals: tuple[str, ...] = ("SIGUSR1",), requeue: str = "auto"):
        if requeue not in ("auto", "always", "never"):
            raise ValueError(f"requeue must be auto (under SLURM), always or never, got {requeue!r}")
        self.path = Path(path)
        self.signals = tuple(getattr(signal, s) if isinstance(s, str) else s for s in signals)
        self.requeue = requeue
        self.received: int | None = None
        self.saved_at_step: int | None = None
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.received, self.saved_at_step = None, None
        for signum in self.signals:  # after Lightning's own registration, so these replace its SLURM handler
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        log.info("received %s: stopping at the end of this step", signal.Signals(signum).name)
        self.received = signum
        if self._trainer is not None:
            self._trainer._signal_connector.received_sigterm = True  # Lightning stops all ranks at a step boundary

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self.received is None:
            self.received = signal.SIGTERM
        trainer.save_checkpoint(self.path, weights_only=False)
        trainer.strategy.barrier("t2i-preemption-checkpoint")
        self.saved_at_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"[t2i] {signal.Signals(self.received).name}: saved {self.path} at step {trainer.global_step}",
                  flush=True)
            self._maybe_requeue()

    def _maybe_requeue(self) -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        if self.requeue == "never" or (self.requeue == "auto" and not job):
            return
        if not job:
            log.warning("requeue=always but no SLURM job id in the environment: not requeued")
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            print(f"[t2i] requeued SLURM job {job}", flush=True)
        else:
            log.warning("scontrol requeue %s failed (%s): %s", job, result.returncode, result.stderr.strip())
