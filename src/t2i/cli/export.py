"""Write a stage export from a training checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed ZeRO checkpoint
directory (any stage, gathered on the CPU), so that pipelines and later stages never need DeepSpeed.

    python -m t2i.cli.export run_dir=runs/ldm [ckpt=last|PATH] [out=DIR]

The model is rebuilt from the run's resolved config (``<run_dir>/config.yaml``, written at the start of
training), the checkpoint's weights are loaded strictly (EMA included), and the export holds what the stage
exports (EMA weights when EMA is on), with its export metrics (e.g. the VAE's latent scale) recomputed.

An LDM stage export handed to the diffusers ecosystem (t2i.interop.diffusers_export):

    python -m t2i.cli.export format=diffusers export=runs/tiny-ldm/export out=DIR [vae_export=DIR]
        [spacing=leading|trailing|linspace] [text_encoder=auto|skip]
    python -m t2i.cli.export format=diffusers run_dir=runs/tiny-ldm out=DIR      # the run's export folder
    python -m t2i.cli.export format=single_file export=runs/tiny-ldm/export out=FILE.safetensors

format=diffusers writes a StableDiffusionPipeline folder (unet/, vae/, scheduler/, model_index.json, and
text_encoder/ + tokenizer/ when transformers is importable; README.md says what was written and why not);
format=single_file one SD 2-layout CompVis checkpoint (model.diffusion_model.*, first_stage_model.*,
cond_stage_model.model.*). Without out=, they go next to the export: <export>/../diffusers and
<export>/../model.safetensors.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate

from t2i.checkpoint_files import checkpoint_problem, is_dcp_checkpoint, is_zero_checkpoint
from t2i.checkpointing import CheckpointError, check_stage_tag
from t2i.config_layout import upgrade_model_config
from t2i.distributed.deepspeed import zero_checkpoint_state_dict, zero_client_state
from t2i.distributed.fsdp import dcp_client_state, dcp_state_dict
from t2i.exports import write_export

log = logging.getLogger("t2i.export")


def checkpoint_state(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """(the LightningModule's full state dict, global step) of a checkpoint file, ZeRO or distributed checkpoint
    directory."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(problem)
    if is_zero_checkpoint(path):
        return zero_checkpoint_state_dict(path), int(zero_client_state(path).get("global_step", -1))
    if is_dcp_checkpoint(path):  # strategy=fsdp
        return dcp_state_dict(path), int(dcp_client_state(path).get("global_step", -1))
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
    """Rebuild the stage of `config` on the CPU, load `ckpt` into it, write its export to `out`. A run of an older
    config layout is read as today's (`t2i.config_layout`, and the stage's ``on_load_checkpoint`` for its keys)."""
    config = {**config, "model": upgrade_model_config(dict(config["model"]))}
    model = instantiate(config["model"])
    check_stage_tag(ckpt, model)
    state, step = checkpoint_state(ckpt)
    holder = {"state_dict": state}
    model.on_load_checkpoint(holder)
    state = holder["state_dict"]
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


FORMATS = ("export", "diffusers", "single_file")
_KEYS = {"export": {"run_dir", "ckpt", "out", "format"},
         "diffusers": {"run_dir", "export", "out", "format", "vae_export", "spacing", "text_encoder"},
         "single_file": {"run_dir", "export", "out", "format", "vae_export", "spacing"}}
_USAGE = {"export": "run_dir=DIR [ckpt=last|PATH] [out=DIR]",
          "diffusers": "format=diffusers export=DIR|run_dir=DIR [out=DIR] [vae_export=DIR] [spacing=leading|trailing|"
                       "linspace] [text_encoder=auto|skip]",
          "single_file": "format=single_file export=DIR|run_dir=DIR [out=FILE.safetensors] [vae_export=DIR] "
                         "[spacing=...]"}


def _run_config(run_dir: Path) -> dict:
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"{config_file} not found: run_dir must be a training run's folder (train.py writes it)")
    return yaml.safe_load(config_file.read_text(encoding="utf-8"))


def _interop(fmt: str, kv: dict[str, str]) -> None:
    """format=diffusers / single_file: an LDM stage export -> a diffusers folder / one SD checkpoint file."""
    from t2i.exports import ExportError
    from t2i.interop.diffusers_export import DiffusersExportError, export_diffusers, export_single_file

    if ("export" in kv) == ("run_dir" in kv):
        raise SystemExit(f"format={fmt} takes export=DIR (an LDM stage export) or run_dir=DIR (its run), one of them")
    if "export" in kv:
        export = Path(kv["export"])
    else:
        run_dir = Path(kv["run_dir"])
        export = Path(_run_config(run_dir).get("export_dir") or run_dir / "export")
    default = export.parent / ("diffusers" if fmt == "diffusers" else "model.safetensors")
    out = Path(kv.get("out", default))
    try:
        if fmt == "diffusers":
            result = export_diffusers(export, out, vae_export=kv.get("vae_export"), spacing=kv.get("spacing"),
                                      text_encoder=kv.get("text_encoder", "auto"))
        else:
            result = export_single_file(export, out, vae_export=kv.get("vae_export"), spacing=kv.get("spacing"))
    except (ExportError, DiffusersExportError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"[t2i] cannot export {export} as format={fmt}: {e}") from None
    for warning in result.warnings:
        print(f"[t2i] WARNING: {warning}")
    if fmt == "diffusers":
        sched = result.scheduler
        kind = (f"beta_schedule={sched.config['beta_schedule']}" if sched.named else "trained_betas")
        print(f"[t2i] scheduler: DDIMScheduler {kind}, prediction_type={sched.config['prediction_type']}, "
              f"timestep_spacing={sched.config['timestep_spacing']}, rescale_betas_zero_snr="
              f"{sched.config['rescale_betas_zero_snr']} (alphas_cumprod within {sched.max_abs_error:.1e} of t2i's)")
        for note in result.notes:
            print(f"[t2i] note: {note}")
        print(f"[t2i] text encoder: {'written' if result.text_encoder_written else 'NOT written'}"
              f"{f' ({result.text_encoder_note})' if result.text_encoder_note else ''}")
        print(f"[t2i] diffusers StableDiffusionPipeline folder written to {result.folder} (from {export}; see "
              f"{result.folder / 'README.md'})")
    else:
        print(f"[t2i] single-file checkpoint written to {result.path} ({result.num_tensors} tensors, from {export})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", help="run_dir=DIR [ckpt=last|PATH] [out=DIR], or format=diffusers|"
                                                "single_file export=DIR|run_dir=DIR [out=...]")
    items = parser.parse_args(argv).args
    bad = [a for a in items if "=" not in a]
    if bad:
        parser.error(f"arguments are key=value, got {bad}")
    kv = dict(a.split("=", 1) for a in items)
    fmt = kv.get("format", "export")
    if fmt not in FORMATS:
        parser.error(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    unknown = set(kv) - _KEYS[fmt]
    if unknown or (fmt == "export" and "run_dir" not in kv):
        parser.error(f"expected {_USAGE[fmt]}, got {sorted(kv)}")
    if fmt != "export":
        _interop(fmt, kv)
        return
    run_dir = Path(kv["run_dir"])
    config = _run_config(run_dir)
    ckpt = kv.get("ckpt", "last")
    ckpt = run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    out = Path(kv.get("out", config.get("export_dir") or run_dir / "export"))
    folder = export_from_checkpoint(config, ckpt, out)
    print(f"[t2i] export written to {folder} (from {ckpt})")


if __name__ == "__main__":
    main()
