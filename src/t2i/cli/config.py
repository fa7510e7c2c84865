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


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the training config exactly as the command line would, from a list of overrides."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
