"""benchmarks/unet_step.py's SD2-base configs: our UNet and diffusers' UNet2DConditionModel built alike (on the meta
device: parameters, FLOPs, heads and the blocks --compile compiles), nothing run."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from t2i_testing import REPO

pytest.importorskip("diffusers")


def _load():
    spec = importlib.util.spec_from_file_location("unet_step", REPO / "benchmarks" / "unet_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sd2_configs_match_diffusers():
    us = _load()
    assert us.CONFIGS["sd2-256"]._replace(latent_side=64, batch=16) == us.CONFIGS["sd2-512"]
    cfg = us.CONFIGS["sd2-256"]
    assert (cfg.head_channels, cfg.context_dim, cfg.context_length, cfg.linear_projection, cfg.latent_side) == \
        (64, 1024, 77, True, 32)
    with torch.device("meta"):
        ours, theirs = us.ours(cfg), us.theirs(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 865_910_724
    heads = sorted({m.heads for m in ours.modules() if type(m).__name__ == "CrossAttention"})
    assert heads == sorted({m.heads for m in theirs.modules() if type(m).__name__ == "Attention"}) == [5, 10, 20]
    flops = us.count_flops(us.ours, cfg, us.call_ours)
    assert flops == us.count_flops(us.theirs, cfg, us.call_theirs)
    assert 539e9 < flops < 540e9  # forward + backward per image at 256^2
    # --compile blocks: every input/middle/output block of ours, every down/mid/up block of diffusers'
    assert len(us.blocks(ours)) == len(ours.input_blocks) + 1 + len(ours.output_blocks) == 25
    assert len(us.blocks(theirs)) == 9
