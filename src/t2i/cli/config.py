"""Where the config tree lives and how to compose it outside `@hydra.main` (tests, recipe runner)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

# ${cwd:} in configs: the directory a command runs in, so that resolved paths are absolute (exports
# record where their parents are, wherever they are read from later).
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)


def cpu_precision() -> str:
    """``bf16-mixed`` where this CPU has bfloat16 instructions (AVX512-BF16 or AMX) for oneDNN to run, else
    ``32-true``: without them oneDNN emulates bf16 in software, several times slower than fp32 on AVX512 cores
    and tens of times on AVX2-only ones."""
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


# ${cpu_precision:} in configs/trainer/cpu.yaml: the tiny CPU runs' precision, chosen for the machine
OmegaConf.register_new_resolver("cpu_precision", cpu_precision, replace=True)


def config_dir() -> Path:
    """``configs/`` of the source tree (override with T2I_CONFIG_DIR)."""
    env = os.environ.get("T2I_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "configs"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"config tree not found at {path}; set T2I_CONFIG_DIR to the repo's configs/")
    return path


# keys of the diffusion stages that moved into their parts (t2i.config_layout reads old exports; a command line
# that names an old key gets the new one here instead of Hydra's "not in struct")
MOVED_KEYS = {"model.first_stage_export": "model.target.export",
              "model.latents_from": "model.target.precomputed (true for latent.npy in the shards)",
              "model.scale_fit_samples": "model.target.fit_samples", "model.low_res": "model.conditioner.low_res",
              "model.crop_size": "model.conditioner.crop_size", "model.prediction": "model.objective.prediction",
              "model.loss_weighting": "model.objective.loss_weighting",
              "model.min_snr_gamma": "model.objective.min_snr_gamma",
              "model.offset_noise": "model.objective.offset_noise", "model.val_sample_batches": "model.preview.batches",
              "model.best_of": "model.preview.best_of"}


def check_moved_keys(overrides: Sequence[str]) -> None:
    """Refuse an override of a key that moved, naming where it is now."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in MOVED_KEYS:
            raise ValueError(f"{key} is now {MOVED_KEYS[key]} (the diffusion stage's parts, docs/configuration.md)")


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the training config exactly as the command line would, from a list of overrides."""
    check_moved_keys(overrides)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
