"""A checkpoint records the stage that wrote it; resuming another type of stage from it is refused before any
training, and the refused run leaves the checkpoint and its run folder untouched."""

from __future__ import annotations

import pytest
from t2i_testing import load_checkpoint, tiny_ldm_overrides, tiny_overrides

from t2i.checkpointing import CheckpointError
from t2i.cli.config import compose_config
from t2i.cli.train import train

QUICK = ("final_validation=false", "export=false")


@pytest.fixture
def vae_run(small_shapes, tmp_path):
    run = tmp_path / "vae"
    train(compose_config(tiny_overrides(small_shapes, run, "trainer.max_steps=2", *QUICK)))
    return run


def _snapshot(run):
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


def _assert_refused(err, ckpt):
    message = str(err.value)
    assert str(ckpt) in message
    assert "'autoencoder' stage (t2i.stages.autoencoder.AutoencoderStage)" in message
    assert "'ldm' stage (t2i.stages.diffusion.DiffusionStage)" in message


def test_vae_checkpoint_records_its_stage(vae_run):
    tag = load_checkpoint(vae_run / "checkpoints" / "last.ckpt")["t2i"]
    assert tag == {"stage_class": "t2i.stages.autoencoder.AutoencoderStage", "stage": "autoencoder"}


def test_ldm_refuses_to_resume_a_vae_run_dir(small_shapes, tiny_vae_export, vae_run, tmp_path):
    before = _snapshot(vae_run)
    start = tmp_path / "start_step"
    with pytest.raises(CheckpointError) as err:
        train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, vae_run, "trainer.max_steps=4",
                                                "ckpt_path=last", *QUICK,
                                                "+callbacks.start._target_=t2i_testing.RecordStartStep",
                                                f"+callbacks.start.path={start}")))
    _assert_refused(err, vae_run / "checkpoints" / "last.ckpt")
    assert not start.exists(), "training started"
    assert _snapshot(vae_run) == before  # checkpoints (bytes and mtime), config.yaml and logs as they were


def test_ldm_refuses_an_explicit_vae_checkpoint(small_shapes, tiny_vae_export, vae_run, tmp_path):
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    before = _snapshot(vae_run)
    run = tmp_path / "ldm"
    with pytest.raises(CheckpointError) as err:
        train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, run, "trainer.max_steps=4",
                                                f"ckpt_path={ckpt}", *QUICK)))
    _assert_refused(err, ckpt)
    assert _snapshot(vae_run) == before
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
