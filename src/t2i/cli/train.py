"""Train one stage: ``python -m t2i.cli.train experiment=tiny/vae [key=value ...]``.

Every Trainer flag is an override (``trainer.max_steps=100``, ``trainer.fast_dev_run=true``);
``ckpt_path=last`` resumes from ``<run_dir>/checkpoints/last.ckpt`` when it exists. At the end the
stage writes ``last.ckpt`` and its export (``<run_dir>/export``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from t2i.callbacks.final_checkpoint import FinalCheckpoint
from t2i.callbacks.rng_state import RngStateCallback
from t2i.cli.config import config_dir
from t2i.exports import write_export

log = logging.getLogger("t2i.train")


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path
    export_dir: Path | None
    metrics: dict


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        log.info("ckpt_path=last but %s does not exist: starting from scratch", last)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    return ckpt_path


def _float_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))
            and (not isinstance(v, torch.Tensor) or v.numel() == 1)}


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    callbacks += [RngStateCallback(cfg.seed), FinalCheckpoint(run_dir / "checkpoints" / "last.ckpt")]
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg is not None] or False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))


def train(cfg: DictConfig) -> TrainResult:
    """Fit the configured stage, save ``last.ckpt``, validate, and write the stage export."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # missing or empty shard lists fail here, before any model is built
    model = instantiate(cfg.model)
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_checkpoint(cfg.get("ckpt_path"), run_dir),
                weights_only=True)  # a checkpoint never runs code
    last = run_dir / "checkpoints" / "last.ckpt"  # written by FinalCheckpoint at the end of training
    metrics = _float_metrics(trainer.callback_metrics)
    if cfg.get("final_validation", True) and datamodule.val_data is not None and not trainer.fast_dev_run:
        metrics.update(_float_metrics(trainer.validate(model, datamodule=datamodule, verbose=False)[0]))
    export_dir = None
    if cfg.get("export", True) and trainer.is_global_zero:
        metrics.update(model.export_metrics(datamodule) if hasattr(model, "export_metrics") else {})
        export_dir = write_export(
            cfg.export_dir, model.stage_name, model.export_state_dict(),
            OmegaConf.to_container(cfg, resolve=True), metrics=metrics,
            parents=dict(cfg.get("parents") or {}), extra={"global_step": trainer.global_step})
        log.info("export written to %s", export_dir)
    return TrainResult(run_dir, last, export_dir, metrics)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    print(f"[t2i] run: {result.run_dir}  export: {result.export_dir}")
    for k, v in sorted(result.metrics.items()):
        print(f"[t2i]   {k} = {v:.6g}")


if __name__ == "__main__":
    main()
