"""Log the training stream's skipped-sample counts (kept exact by `ResumableLoader`)."""

from __future__ import annotations

import lightning as L


class DataStatsLogger(L.Callback):
    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loader = getattr(trainer.datamodule, "train_loader", None)
        if loader is None or trainer.global_step % self.every_n_steps:
            return
        stats = loader.stats
        pl_module.log_dict({"data/skipped": float(stats.skipped), "data/skipped_fraction": stats.fraction},
                           on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = getattr(trainer.datamodule, "train_loader", None)
        if loader is not None and loader.stats.skipped:
            print(f"[t2i] rank {trainer.global_rank}: {loader.stats.report()}")
