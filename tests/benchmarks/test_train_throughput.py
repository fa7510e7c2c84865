"""benchmarks/train_throughput.py on the CPU: a real (tiny) LDM training run under strategy=ddp in a child process,
and the row it prints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from t2i_testing import REPO

SCRIPT = REPO / "benchmarks" / "train_throughput.py"
COLUMNS = ["strategy", "global batch", "images/s", "step ms", "in-step ms", "peak mem GiB", "GFLOP/image", "TFLOP/s",
           "MFU", "precision", "layout"]


def _load():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    header, rows = None, {}
    for line in stdout.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        else:
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_cpu_ddp_row_has_throughput_flops_and_mfu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--device", "cpu", "--strategy", "ddp", "deepspeed_stage_2",
           "--steps", "3", "--warmup", "1", "--batch", "8", "--peak-tflops", "0.1", "--timeout", "240",
           "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert set(rows) == {"ddp", "deepspeed_stage_2"}, proc.stdout
    ddp = rows["ddp"]
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
    # DeepSpeed on the CPU is skipped with its reason, not run (no DS_ACCELERATOR=cpu)
    assert "needs CUDA" in rows["deepspeed_stage_2"]["layout"]
    # the child trained under Lightning's DDP strategy (strategy=ddp), not the single-device default
    result = json.loads((tmp_path / "work" / "ddp.json").read_text())
    assert result["strategy_class"] == "DDPStrategy" and result["world_size"] == 1


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
