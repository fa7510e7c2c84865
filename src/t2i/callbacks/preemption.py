"""Pre-emption: on SIGTERM or SIGUSR1, finish the current step, save ``last.ckpt`` and exit (requeueing the SLURM
job when asked), so a resumed run (``ckpt_path=last``) continues exactly where this one stopped.

Lightning turns SIGTERM into a `SIGTERMException` at the next step boundary, agreed across ranks (rank 0's
flag is broadcast each step). SIGUSR1 (what ``sbatch --signal=USR1@120`` sends before the time limit) and SIGUSR2
(what submitit asks SLURM to send) are routed into the same flag, replacing Lightning's SLURM handler, which saves
an ``hpc_ckpt`` from inside the signal handler, i.e. possibly in the middle of a step. The checkpoint is written
from ``on_exception``, while the loops and the data position still exist.

Requeueing: a handler that was installed for the signal before training started (submitit's, which resubmits
the job and counts timeouts) is handed the signal once the checkpoint is written (`Preempted.hand_over`);
without one, rank 0 runs ``scontrol requeue`` under SLURM (``requeue: auto``).
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

    def __init__(self, signum: int, checkpoint: Path, step: int, previous_handler=None):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        self.previous_handler = previous_handler
        super().__init__(f"pre-empted by {signal.Signals(signum).name} at step {step}: saved {checkpoint}; "
                         f"resume with ckpt_path=last")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def hand_over(self) -> None:
        """Call the handler the signal had before training (e.g. submitit's requeue); it may exit the process."""
        if callable(self.previous_handler):
            self.previous_handler(self.signum, None)


class PreemptionCheckpoint(L.Callback):
    def __init__(self, path: str, signals: tuple[str, ...] = ("SIGUSR1", "SIGUSR2"), requeue: str = "auto"):
        if requeue not in ("auto", "always", "never"):
            raise ValueError(f"requeue must be auto (under SLURM), always or never, got {requeue!r}")
        self.path = Path(path)
        self.signals = tuple(getattr(signal, s) if isinstance(s, str) else s for s in signals)
        self.requeue = requeue
        self.received: int | None = None
        self.saved_at_step: int | None = None
        self._trainer: L.Trainer | None = None
        self.previous_handlers: dict[int, object] = {}

    @property
    def previous_handler(self):
        """The handler the received signal had before training (None: default, ignored or ours)."""
        handler = self.previous_handlers.get(self.received)
        return handler if callable(handler) and self.requeue != "never" else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.received, self.saved_at_step = None, None
        for signum in self.signals:  # after Lightning's own registration, so these replace its SLURM handler
            previous = signal.signal(signum, self._on_signal)
            lightning_own = type(previous).__name__ == "_HandlersCompose"  # its SLURM handler, replaced on purpose
            if signum not in self.previous_handlers and not lightning_own and previous != self._on_signal:
                self.previous_handlers[signum] = previous

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
            if self.previous_handler is None:  # else the previous handler requeues (train.main hands over)
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
