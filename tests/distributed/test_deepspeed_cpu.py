"""DeepSpeed ZeRO on the CPU (DeepSpeed's CPU accelerator, gloo): the strategy configs, and the tiny LDM stage
trained under each ZeRO stage against plain training of the same run (fp32, same seed): weights and EMA equal
(to fp32 rounding), the export converted from the ZeRO checkpoint directory equal to the plain export, exact
resume from a sharded checkpoint, and ZeRO-3 with every parameter sharded over 2 ranks equal to DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from t2i_testing import REPO, assert_export_holds_the_ema, assert_same_run_end, tiny_ldm_overrides

from t2i.checkpoint_files import checkpoint_problem
from t2i.cli.config import compose_config
from t2i.cli.export import checkpoint_state
from t2i.cli.train import train

STEPS = 4
COMMON = (f"trainer.max_steps={STEPS}", "trainer.precision=32-true", "trainer.val_check_interval=null",
          "trainer.limit_val_batches=0", "final_validation=false")
STRATEGIES = ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
              "deepspeed_stage_3_offload"]


def _zero_args(strategy: str, *extra: str) -> list[str]:
    args = [f"strategy={strategy}", "strategy.pin_memory=false"]
    if "stage_3" in strategy:
        args.append("+strategy.param_persistence_threshold=0")  # shard every parameter, however small
    return args + list(extra)


def run_cli(small_shapes, vae_export, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    overrides = tiny_ldm_overrides(small_shapes, vae_export, run_dir, *COMMON, *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.train", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def plain_run(small_shapes, tiny_vae_export, tmp_path_factory) -> Path:
    """The reference: the same run without DeepSpeed (one process)."""
    run = tmp_path_factory.mktemp("plain")
    train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, run, *COMMON)))
    return run


def assert_same_training(run: Path, reference: Path) -> None:
    assert_same_run_end(run, reference, STEPS, atol=1e-6)


def test_strategy_configs_hold_the_documented_settings(monkeypatch):
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    from t2i.distributed.deepspeed import AtomicDeepSpeedStrategy, AutocastDeepSpeedPrecision

    for name in STRATEGIES:
        cfg = compose_config(["experiment=tiny/ldm", f"strategy={name}"])
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_algorithm == "norm"
        from hydra.utils import instantiate
        strategy = instantiate(cfg.strategy)
        assert isinstance(strategy, AtomicDeepSpeedStrategy)
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(name.split("_")[2])
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 200_000_000
        assert zero["overlap_comm"] and zero["contiguous_gradients"]
        offloaded = "offload" in name
        assert ("offload_optimizer" in zero) == offloaded
        assert ("offload_param" in zero) == (name == "deepspeed_stage_3_offload")
        assert strategy.config.get("zero_force_ds_cpu_optimizer", True) is not offloaded
        strategy.precision_plugin = DeepSpeedPrecision("bf16-mixed")
        assert isinstance(strategy.precision_plugin, AutocastDeepSpeedPrecision)
        assert strategy.precision_plugin.precision == "32-true"  # fp32 weights in the engine
        with strategy.precision_plugin.forward_context():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with pytest.raises(ValueError, match="bf16-mixed"):
            strategy.precision_plugin = DeepSpeedPrecision("16-mixed")
    strategy = AtomicDeepSpeedStrategy(stage=2)
    strategy.accelerator = CPUAccelerator()
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cpu"):
        strategy.setup_environment()


@pytest.mark.parametrize("strategy", [
    "deepspeed_stage_2", "deepspeed_stage_3",
    pytest.param("deepspeed_stage_1", marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_2_offload", marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_3_offload", marks=pytest.mark.slow)])
def test_zero_training_equals_plain_training(small_shapes, tiny_vae_export, plain_run, tmp_path, strategy):
    run = tmp_path / strategy
    run_cli(small_shapes, tiny_vae_export, run, *_zero_args(strategy))
    assert (run / "checkpoints" / "last.ckpt" / "latest").is_file(), "not a ZeRO checkpoint directory"
    assert_same_training(run, plain_run)
    assert_export_holds_the_ema(run, plain_run, tmp_path, atol=1e-6)


def test_zero3_resume_continues_exactly(small_shapes, tiny_vae_export, plain_run, tmp_path):
    """Stop after 2 steps, resume the sharded checkpoint to 4: EMA shards, optimizer partitions, RNG states and
    the data position are restored (the result equals the uninterrupted plain run)."""
    run = tmp_path / "resumed"
    run_cli(small_shapes, tiny_vae_export, run, *_zero_args("deepspeed_stage_3", "trainer.max_steps=2",
                                                            "export=false"))
    proc = run_cli(small_shapes, tiny_vae_export, run, *_zero_args("deepspeed_stage_3", "ckpt_path=last",
                                                                   "export=false"))
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr, "the second run did not resume"
    assert_same_training(run, plain_run)
    # the step-2 directory the second run resumed from is kept whole beside the step-4 one
    previous = run / "checkpoints" / "last.ckpt.prev"
    assert checkpoint_problem(previous) is None and checkpoint_state(previous)[1] == 2


@pytest.mark.slow
def test_zero3_on_two_ranks_equals_ddp_on_two_ranks(small_shapes, tiny_vae_export, tmp_path):
    """Every parameter sharded over 2 ranks (each rank averages its own EMA shard) against DDP on 2 ranks."""
    ddp = tmp_path / "ddp"
    run_cli(small_shapes, tiny_vae_export, ddp, "strategy=ddp", "trainer.devices=2", "export=false")
    zero = tmp_path / "zero3"
    run_cli(small_shapes, tiny_vae_export, zero, *_zero_args("deepspeed_stage_3", "trainer.devices=2",
                                                             "export=false"))
    shards = sorted(p.name for p in (zero / "checkpoints" / "last.ckpt" / "checkpoint").iterdir())
    assert any("rank_1" in s for s in shards), f"expected one shard per rank, got {shards}"
    assert_same_training(zero, ddp)
