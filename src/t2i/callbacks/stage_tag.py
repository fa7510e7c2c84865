"""Record in every checkpoint which stage wrote it (`t2i.checkpointing.check_stage_tag` reads it on resume)."""

from __future__ import annotations

import lightning as L

from t2i.checkpointing import TAG_KEY, stage_tag


class StageTag(L.Callback):
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[TAG_KEY] = stage_tag(pl_module)
