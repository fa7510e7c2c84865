"""On a CUDA device: the tiny LDM stage under each DeepSpeed ZeRO strategy (in a subprocess each, as on a cluster),
against plain single-GPU training of the same run. fp32 weights: equal up to GPU non-determinism; bf16 autocast:
trains, keeps the EMA in fp32, converts its ZeRO checkpoint into an export that the LDM pipeline samples from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from t2i_testing import REPO, tiny_ldm_overrides

from t2i.cli.export import checkpoint_state

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 6
GPU = ("trainer.accelerator=gpu", "trainer.devices=1", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=null",
       "trainer.limit_val_batches=0", "final_validation=false")


def _run(small_shapes, vae_export, run, *extra):
    args = tiny_ldm_overrides(small_shapes, vae_export, run, *GPU, *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def plain_fp32(small_shapes, tiny_vae_export, tmp_path_factory):
    run = tmp_path_factory.mktemp("plain")
    _run(small_shapes, tiny_vae_export, run, "trainer.precision=32-true", "export=false")
    return checkpoint_state(run / "checkpoints" / "last.ckpt")[0]


@pytest.mark.parametrize("strategy", [  # gpu_check.sh runs the unmarked ones (its time is short)
    "deepspeed_stage_2", "deepspeed_stage_3", pytest.param("deepspeed_stage_1", marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_2_offload", marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_3_offload", marks=pytest.mark.slow)])
def test_zero_fp32_equals_plain_training_on_gpu(small_shapes, tiny_vae_export, plain_fp32, tmp_path, strategy):
    run = tmp_path / strategy
    _run(small_shapes, tiny_vae_export, run, f"strategy={strategy}", "trainer.precision=32-true", "export=false")
    state, step = checkpoint_state(run / "checkpoints" / "last.ckpt")
    assert step == STEPS and set(state) == set(plain_fp32)
    for k, v in plain_fp32.items():  # cuDNN/cuBLAS reductions are not bitwise reproducible across engines
        if v.is_floating_point():
            torch.testing.assert_close(state[k].float(), v.float(), rtol=1e-4, atol=1e-5, msg=k)


def test_zero3_bf16_trains_and_exports_a_sampleable_model(small_shapes, tiny_vae_export, tmp_path):
    from t2i.pipelines.sampling import SamplerSettings
    from t2i.pipelines.text_to_image import TextToImagePipeline

    run = tmp_path / "zero3"
    _run(small_shapes, tiny_vae_export, run, "strategy=deepspeed_stage_3", "trainer.precision=bf16-mixed")
    state, _ = checkpoint_state(run / "checkpoints" / "last.ckpt")
    ema = {k: v for k, v in state.items() if k.startswith("ema.module.") and v.is_floating_point()}
    assert ema and all(v.dtype == torch.float32 for v in ema.values())
    exported = load_file(run / "export" / "model.safetensors")
    for k, v in exported.items():
        torch.testing.assert_close(v.float(), state[f"ema.module.{k}"].float(), rtol=0, atol=0, msg=k)
    pipe = TextToImagePipeline.from_export(run / "export", device="cuda")
    images = pipe(["a large red circle in the top left on a white background"], SamplerSettings(steps=3), seed=0)
    assert images.shape[0] == 1 and torch.isfinite(images).all()
