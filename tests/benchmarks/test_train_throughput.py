"""benchmarks/train_throughput.py on the CPU: a real (tiny) LDM training run under strategy=ddp in a child process
per switch set, and the rows it prints; the sd2 runs' composed configs (--dry-run), the switch sets, the frozen text
tower's zero checkpoint and the computed memory table."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from t2i_testing import REPO

SCRIPT = REPO / "benchmarks" / "train_throughput.py"
COLUMNS = ["strategy", "switches", "global batch", "images/s", "step ms", "in-step ms", "peak mem GiB", "GFLOP/image", "TFLOP/s",
           "MFU", "precision", "layout"]


def _load():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(stdout: str) -> dict[tuple[str, str], dict[str, str]]:
    """The printed table's rows by (strategy, switch set)."""
    header, rows = None, {}
    for line in stdout.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        else:
            rows[cells[0], cells[1]] = dict(zip(header, cells))
    return rows


def test_cpu_ddp_row_has_throughput_flops_and_mfu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--device", "cpu", "--strategy", "ddp", "deepspeed_stage_2",
           "--switches", "plain", "fused+channels_last", "--steps", "3", "--warmup", "1", "--batch", "8",
           "--peak-tflops", "0.1", "--timeout", "240", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert list(rows) == [("ddp", "plain"), ("ddp", "fused+channels_last"), ("deepspeed_stage_2", "plain"),
                          ("deepspeed_stage_2", "fused+channels_last")], proc.stdout
    ddp = rows["ddp", "plain"]
    assert list(ddp) == COLUMNS
    assert int(ddp["global batch"]) == 8
    assert float(ddp["images/s"]) > 0
    assert float(ddp["step ms"]) >= float(ddp["in-step ms"]) > 0
    assert float(ddp["GFLOP/image"]) > 0 and float(ddp["TFLOP/s"]) > 0
    assert ddp["MFU"].endswith("%") and float(ddp["MFU"][:-1]) > 0  # from --peak-tflops
    assert ddp["peak mem GiB"] == "n/a" and ddp["precision"] == "32-true" and ddp["layout"] == "nchw"
    # images/s x FLOPs per image = the achieved rate
    achieved = float(ddp["images/s"]) * float(ddp["GFLOP/image"]) / 1000
    assert abs(achieved - float(ddp["TFLOP/s"])) <= 0.02 * achieved + 1e-3
    fast = rows["ddp", "fused+channels_last"]
    assert float(fast["images/s"]) > 0 and fast["layout"] == "channels_last" and fast["GFLOP/image"] == ddp["GFLOP/image"]
    # DeepSpeed on the CPU is skipped with its reason, not run (no DS_ACCELERATOR=cpu)
    assert "needs CUDA" in rows["deepspeed_stage_2", "plain"]["layout"]
    # the child trained under Lightning's DDP strategy (strategy=ddp), not the single-device default
    result = json.loads((tmp_path / "work" / "ddp.json").read_text())
    assert result["strategy_class"] == "DDPStrategy" and result["world_size"] == 1
    assert (tmp_path / "work" / "ddp__fused+channels_last.json").is_file()


def test_switch_sets_parse_and_set_every_switch():
    tt = _load()
    assert tt.parse_switches("plain") == "plain"
    assert tt.parse_switches("channels_last+fused+compile") == "channels_last+fused+compile"
    assert tt.parse_switches("plain", channels_last=True) == "channels_last"  # the old --channels-last
    assert tt.parse_switches("fused", channels_last=True) == "fused+channels_last"
    for bad in ("plain+fused", "compile+compile_denoiser", "turbo", ""):
        with pytest.raises(ValueError):
            tt.parse_switches(bad)
    # plain turns everything off (experiment=ldm/ldm turns compile and fused on); each switch turns its own on
    assert tt.switch_overrides("plain") == ["channels_last=false", "compile.scope=null", "++model.optimizer.fused=null",
                                            "model.denoiser.gradient_checkpointing=false"]
    assert tt.switch_overrides("fused+compile_denoiser+checkpointing") == [
        "channels_last=false", "compile.scope=denoiser", "++model.optimizer.fused=true",
        "model.denoiser.gradient_checkpointing=true"]
    assert tt.run_id("ddp", "plain") == "ddp" and tt.run_id("ddp", "fused") == "ddp__fused"


def test_sd2_dry_run_composes_every_switch_set():
    """--config sd2 --dry-run: each run's config composed as its child would (nothing trained), with the SD2-base
    UNet, the ViT-H/14 penultimate text states and each switch set's overrides resolved."""
    tt = _load()
    out = io.StringIO()
    argv = ["--config", "sd2", "--side", "512", "--device", "cuda", "--batch", "2", "--strategy", "ddp", "--switches",
            "plain", "channels_last+fused+compile", "compile_denoiser+checkpointing", "--dry-run"]
    with contextlib.redirect_stdout(out):
        tt.main(argv)
    lines = out.getvalue().splitlines()
    runs = {ln.split(":")[0].strip(): ln for ln in lines if ln.startswith("  ddp [")}
    assert set(runs) == {"ddp [plain]", "ddp [channels_last+fused+compile]", "ddp [compile_denoiser+checkpointing]"}
    for line in runs.values():
        assert "DDPStrategy" in line and "precision bf16-mixed" in line and "batch 2;" in line
        assert "text ViT-H-14/penultimate" in line and "context_dim 1024, head channels 64, linear True" in line
    assert "compile.scope None; optimizer fused None; gradient_checkpointing False; channels_last False" in runs["ddp [plain]"]
    assert ("compile.scope blocks; optimizer fused True; gradient_checkpointing False; channels_last True"
            in runs["ddp [channels_last+fused+compile]"])
    assert ("compile.scope denoiser; optimizer fused None; gradient_checkpointing True; channels_last False"
            in runs["ddp [compile_denoiser+checkpointing]"])
    assert "UNet 865,910,724 params" in lines[-1] and "at 64x64x4 latents" in lines[-1] and "0 run(s) failed" in lines[-1]


def test_frozen_text_checkpoint_is_small_and_matches_the_tower(tmp_path):
    """The ViT-H/14 text tower's checkpoint: every key and shape the strict load checks, zeros, one shared buffer."""
    tt = _load()
    from t2i.conditioning.text import OpenClipTextEncoder
    from t2i.weights import check_state_dict, load_tensor_file
    size = tt.write_text_checkpoint(tmp_path / "text.pt", "ViT-H-14")
    assert size < 110e6  # the token embedding (49408 x 1024 float16), stored once; 708 MB as separate tensors
    with torch.device("meta"):
        tower, _ = OpenClipTextEncoder.build_tower("ViT-H-14", False)
    sd = load_tensor_file(tmp_path / "text.pt")
    check_state_dict(sd, tower, "the text tower", tmp_path / "text.pt")
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in tower.state_dict().values()) > 350e6
    assert not sd["token_embedding.weight"].any()


def test_memory_rows_are_the_zero_accounting():
    tt = _load()
    rows = {(s, n): v for s, n, v in tt.memory_rows(1000, persistent=0, gpus=(1, 8))}
    assert rows["ddp", 8] == [4000, 4000, 8000, 4000, 0, 20000]  # weights, grads, Adam, EMA, master, total
    assert rows["deepspeed_stage_1", 8] == [4000, 4000, 1000, 4000, 500, 13500]
    assert rows["deepspeed_stage_2", 8] == [4000, 500, 1000, 4000, 500, 10000]
    assert rows["deepspeed_stage_3", 8] == rows["fsdp", 8] == [500, 500, 1000, 500, 0, 2500]
    assert rows["fsdp", 1] == rows["ddp", 1]
    persistent = {(s, n): v for s, n, v in tt.memory_rows(1000, persistent=100, gpus=(8,))}
    assert persistent["deepspeed_stage_3", 8][0] == 500 + 4 * 100 * 7 / 8  # small parameters whole on every rank


def test_flops_and_peak_lookup():
    tt = _load()
    assert tt.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert tt.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert tt.peak_flops("NVIDIA H200", None) == 989e12
    assert tt.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert tt.peak_flops("NVIDIA GeForce RTX 4090", None) is None
    assert tt.peak_flops("anything", 100.0) == 100e12

    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"model": {"text_encoder": {"context_length": 8}, "denoiser": {
        "_target_": "t2i.nn.unet.UNet", "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "num_head_channels": 32,
        "context_dim": 16}}})
    fwd, total, params = tt.count_flops(cfg, batch=2, side=8)
    fwd4, total4, _ = tt.count_flops(cfg, batch=4, side=8)
    assert params > 0 and 0 < fwd < total
    assert 2.5 < total / fwd < 3.2  # backward ~ 2x forward (no input gradient for the first conv)
    assert abs(fwd4 - 2 * fwd) < 1e-6 * fwd4 and abs(total4 - 2 * total) < 1e-6 * total4  # linear in the batch
