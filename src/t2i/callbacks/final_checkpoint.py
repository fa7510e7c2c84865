"""Write ``last.ckpt`` when training ends, while the loops (and the data position) still exist.

Saving after `trainer.fit` returns would lose the data stream's position, which Lightning drops at
teardown. The file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class FinalCheckpoint(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # all ranks take part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("t2i-final-checkpoint")
