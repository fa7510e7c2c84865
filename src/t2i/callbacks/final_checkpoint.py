"""Write ``last.ckpt`` when training ends, while the loops (and the data position) still exist.

Saving after `trainer.fit` returns would lose the data stream's position, which Lightning drops at
teardown. The write is atomic (`t2i.checkpointing.AtomicCheckpointIO`, or the DeepSpeed strategy's directory
swap), so a crash never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class FinalCheckpoint(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # all ranks take part; rank 0 (or each shard) writes
        trainer.strategy.barrier("t2i-final-checkpoint")
        for cb in trainer.checkpoint_callbacks:  # (they run after us) a ModelCheckpoint that has not saved yet would
            if Path(cb.dirpath or "") == self.path.parent:  # save "last" again, as last-v1.ckpt
                cb.last_model_path = str(self.path)
                cb._last_checkpoint_saved = str(self.path)
