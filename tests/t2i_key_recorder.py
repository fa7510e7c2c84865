"""A callback for tests that records which sample keys each rank trained on (one file per rank, one line per
batch: ``epoch step key key ...``), to check the data stream's exactly-once guarantee through real runs."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class KeyRecorder(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = f"{trainer.current_epoch} {trainer.global_step} " + " ".join(batch["key"]) + "\n"
        with open(self.out_dir / f"keys_rank{trainer.global_rank}.txt", "a", encoding="utf-8") as f:
            f.write(line)


def read_keys(out_dir: Path) -> dict[int, list[tuple[int, int, list[str]]]]:
    """{rank: [(epoch, step, keys), ...]} in training order."""
    result = {}
    for path in sorted(Path(out_dir).glob("keys_rank*.txt")):
        rank = int(path.stem.removeprefix("keys_rank"))
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            epoch, step, *keys = line.split()
            rows.append((int(epoch), int(step), keys))
        result[rank] = rows
    return result


class ExitAtStep(L.Callback):
    """Ends the process without any cleanup when training reaches `step` (after that step's checkpoint was
    saved), as a pre-emption would: the run must go on from the checkpoint alone."""

    def __init__(self, step: int, code: int = 17):
        self.step, self.code = step, code

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            import os
            os._exit(self.code)
