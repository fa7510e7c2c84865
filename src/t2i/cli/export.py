"""Write a stage export from a training checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed ZeRO checkpoint
directory (any stage, gathered on the CPU), so that pipelines and later stages never need DeepSpeed.

    python -m t2i.cli.export run_dir=runs/ldm [ckpt=last|PATH] [out=DIR]

The model is rebuilt from the run's resolved config (``<run_dir>/config.yaml``, written at the start of
training), the checkpoint's weights are loaded strictly (EMA included), and the export holds what the stage
exports (EMA weights when EMA is on), with its export metrics (e.g. the VAE's latent scale) recomputed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate

from t2i.checkpointing import CheckpointError, check_stage_tag, checkpoint_problem
from t2i.distributed.deepspeed import is_zero_checkpoint, zero_checkpoint_state_dict, zero_client_state
from t2i.exports import write_export

log = logging.getLogger("t2i.export")


def checkpoint_state(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """(the LightningModule's full state dict, global step) of a checkpoint file or ZeRO directory."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(problem)
    if is_zero_checkpoint(path):
        return zero_checkpoint_state_dict(path), int(zero_client_state(path).get("global_step", -1))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} holds no state_dict (not a Lightning training checkpoint)")
    return ckpt["state_dict"], int(ckpt.get("global_step", -1))


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load every key, or fail naming the missing, unexpected and mis-shaped ones."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint {source} does not match the run's model: missing {missing[:10]} "
                              f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
                              f"shape mismatches {shapes[:10]}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def export_from_checkpoint(config: dict, ckpt: str | Path, out: str | Path, metrics: dict | None = None,
                           datamodule=None) -> Path:
    """Rebuild the stage of `config` on the CPU, load `ckpt` into it, write its export to `out`."""
    model = instantiate(config["model"])
    check_stage_tag(ckpt, model)
    state, step = checkpoint_state(ckpt)
    load_strict(model, state, ckpt)
    model.eval()
    metrics = dict(metrics or {})
    if hasattr(model, "export_metrics"):
        if datamodule is None:
            datamodule = instantiate(config["data"])
            datamodule.setup("fit")
        metrics.update(model.export_metrics(datamodule))
    return write_export(out, model.stage_name, model.export_state_dict(), config, metrics=metrics,
                        parents=dict(config.get("parents") or {}),
                        extra={"global_step": step, "from_checkpoint": str(ckpt)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", help="run_dir=DIR [ckpt=last|PATH] [out=DIR]")
    kv = dict(a.split("=", 1) for a in parser.parse_args(argv).args)
    unknown = set(kv) - {"run_dir", "ckpt", "out"}
    if unknown or "run_dir" not in kv:
        parser.error(f"expected run_dir=DIR [ckpt=last|PATH] [out=DIR], got {sorted(kv)}")
    run_dir = Path(kv["run_dir"])
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"{config_file} not found: run_dir must be a training run's folder (train.py writes it)")
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    ckpt = kv.get("ckpt", "last")
    ckpt = run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    out = Path(kv.get("out", config.get("export_dir") or run_dir / "export"))
    folder = export_from_checkpoint(config, ckpt, out)
    print(f"[t2i] export written to {folder} (from {ckpt})")


if __name__ == "__main__":
    main()
