"""strategy=fsdp (FSDP2 fully_shard, t2i.distributed.fsdp) on the CPU over gloo, 2 ranks: the tiny LDM stage
(UNet, jointly trained text tower, learned CFG null, EMA, warm-up LR schedule, gradient clipping) trained in fp32
ends with the weights and EMA of DDP on 2 ranks; its distributed checkpoint converts to the same export; a run
killed after a checkpoint resumes to the same end, also on 1 rank; a damaged checkpoint falls back to the kept previous one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from t2i_testing import REPO, assert_export_holds_the_ema, assert_same_run_end, tiny_ldm_overrides

from t2i.checkpoint_files import checkpoint_problem, is_dcp_checkpoint
from t2i.cli.export import checkpoint_state

STEPS = 4
COMMON = (f"trainer.max_steps={STEPS}", "trainer.precision=32-true", "trainer.val_check_interval=null",
          "trainer.limit_val_batches=0", "final_validation=false", "trainer.devices=2",
          "callbacks.checkpoint.every_n_train_steps=2")


def run_cli(small_shapes, vae_export, run_dir: Path, *args: str, code: int = 0,
            timeout: float = 900) -> subprocess.CompletedProcess:
    overrides = tiny_ldm_overrides(small_shapes, vae_export, run_dir, *COMMON, *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    # its own session, so that a timeout ends every rank (a hung collective would otherwise outlive the test)
    with subprocess.Popen([sys.executable, "-m", "t2i.cli.train", *overrides], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            pytest.fail(f"the run did not end within {timeout} s (hung ranks?):\n{out[-2000:]}{err[-2000:]}")
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(small_shapes, tiny_vae_export, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp")
    run_cli(small_shapes, tiny_vae_export, run, "strategy=ddp", "export=false")
    return run


def assert_same_training(run: Path, reference: Path) -> None:
    assert_same_run_end(run, reference, STEPS, atol=2e-6)


def test_fsdp_training_equals_ddp_and_exports(small_shapes, tiny_vae_export, ddp_run, tmp_path):
    run = tmp_path / "fsdp"
    run_cli(small_shapes, tiny_vae_export, run, "strategy=fsdp")
    last = run / "checkpoints" / "last.ckpt"
    assert is_dcp_checkpoint(last) and len(list(last.glob("*.distcp"))) == 2, "not a 2-rank distributed checkpoint"
    assert checkpoint_problem(last) is None
    assert_same_training(run, ddp_run)
    assert_export_holds_the_ema(run, ddp_run, tmp_path, atol=2e-6)


def test_fsdp_killed_run_resumes_to_the_same_end(small_shapes, tiny_vae_export, ddp_run, tmp_path):
    """The process dies right after the step-2 checkpoint (no cleanup, as a pre-emption); the resumed run
    restores the sharded weights, EMA, AdamW states, RNG and data position, and ends where DDP does. The same
    step-2 folder also resumes on 1 rank (DCP reshards on load)."""
    run = tmp_path / "killed"
    run_cli(small_shapes, tiny_vae_export, run, "strategy=fsdp", "export=false",
            "+callbacks.exit._target_=t2i_key_recorder.ExitAtStep", "+callbacks.exit.step=2", code=17)
    last = run / "checkpoints" / "last.ckpt"
    assert is_dcp_checkpoint(last) and checkpoint_state(last)[1] == 2, list(last.parent.iterdir())
    elastic = tmp_path / "elastic"
    shutil.copytree(run / "checkpoints", elastic / "checkpoints")
    proc = run_cli(small_shapes, tiny_vae_export, run, "strategy=fsdp", "export=false", "ckpt_path=last")
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr, "the second run did not resume"
    assert_same_training(run, ddp_run)
    # each save swaps a whole folder in and keeps the one before it intact (here the periodic step-4 save,
    # which the final save then replaced)
    previous = run / "checkpoints" / "last.ckpt.prev"
    assert checkpoint_problem(previous) is None and checkpoint_state(previous)[1] in (2, STEPS)
    # 2 ranks -> 1, one step on: the rest of the epoch spread over the one rank
    proc = run_cli(small_shapes, tiny_vae_export, elastic, "strategy=fsdp", "export=false", "ckpt_path=last",
                   "trainer.devices=1", "trainer.max_steps=3")
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    state, step = checkpoint_state(elastic / "checkpoints" / "last.ckpt")
    assert step == 3 and all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_fsdp_a_bad_gradient_shard_on_one_rank_skips_the_step_on_every_rank(small_shapes, tiny_vae_export,
                                                                             tmp_path):
    """Each rank sees only its gradient shard: a NaN in rank 1's must skip the step on rank 0 too (the check is
    reduced over ranks). Without that, rank 0 steps and rank 1 skips, and the next collective that only one of
    them makes hangs both: the short timeout turns that into a failure (the run takes under a minute)."""
    run = tmp_path / "poisoned"
    run_cli(small_shapes, tiny_vae_export, run, "strategy=fsdp", "export=false",
            "+callbacks.poison._target_=t2i_testing.PoisonGradients", "+callbacks.poison.steps=[1]",
            "+callbacks.poison.rank=1", timeout=180)
    meta = torch.load(run / "checkpoints" / "last.ckpt" / "meta.pt", map_location="cpu", weights_only=True)
    assert meta["global_step"] == STEPS and meta["callbacks"]["NonFiniteGuard"]["skipped"] == 1  # rank 0's
    state, _ = checkpoint_state(run / "checkpoints" / "last.ckpt")
    assert int(state["ema.num_updates"]) == STEPS - 1
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_fsdp_config(monkeypatch):
    from hydra.utils import instantiate

    from t2i.cli.config import compose_config
    from t2i.distributed.fsdp import FSDP2Strategy
    cfg = compose_config(["experiment=tiny/ldm", "strategy=fsdp", "strategy.param_dtype=bfloat16"])
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy.param_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating dtype"):
        FSDP2Strategy(param_dtype="int8")


@pytest.mark.slow
def test_fsdp_with_compiled_blocks_equals_ddp(small_shapes, tiny_vae_export, ddp_run, tmp_path):
    """Per-block compile on FSDP2 units (Dynamo traces through the units' gather hooks)."""
    run = tmp_path / "compiled"
    run_cli(small_shapes, tiny_vae_export, run, "strategy=fsdp", "export=false", "compile.scope=blocks",
            "compile.backend=aot_eager")
    assert_same_training(run, ddp_run)
