"""``global_batch_size`` fixes the global batch through gradient accumulation (per-device batch x devices x
accumulation), ``lr_reference_batch`` scales the learning rate linearly, and the run prints what it uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from t2i_testing import load_checkpoint, tiny_ldm_overrides, tiny_overrides

from t2i.cli.batch import accumulation_for, apply_global_batch, scaled_lr
from t2i.cli.config import compose_config
from t2i.cli.train import train


@pytest.mark.parametrize(("global_batch", "per_device", "world", "accumulate"),
                         [(32, 8, 1, 4), (32, 8, 2, 2), (32, 8, 4, 1), (96, 8, 3, 4)])
def test_accumulation_for(global_batch, per_device, world, accumulate):
    assert accumulation_for(global_batch, per_device, world) == accumulate


@pytest.mark.parametrize(("global_batch", "per_device", "world"), [(24, 8, 2), (8, 8, 2), (30, 8, 1)])
def test_a_global_batch_that_does_not_divide_is_an_error(global_batch, per_device, world):
    with pytest.raises(ValueError) as err:
        accumulation_for(global_batch, per_device, world)
    assert (f"global_batch_size={global_batch} is not a multiple of data.batch_size x world size = "
            f"{per_device} x {world} = {per_device * world}") in str(err.value)


def test_scaled_lr():
    assert scaled_lr(1e-3, 32, 8) == pytest.approx(4e-3)


def _trainer(devices: int, nodes: int = 1):
    return SimpleNamespace(num_nodes=nodes, num_devices=devices, accumulate_grad_batches=1, is_global_zero=True)


def test_accumulation_follows_the_world_size(small_shapes, tmp_path, capsys):
    """The same config on 2 devices x 2 nodes: accumulation 1 instead of 4, the lr scaled by the same 32/8."""
    cfg = compose_config(tiny_overrides(small_shapes, tmp_path, "global_batch_size=32", "lr_reference_batch=8"))
    trainer = _trainer(devices=2, nodes=2)
    apply_global_batch(cfg, trainer)
    assert trainer.accumulate_grad_batches == 1 and cfg.trainer.accumulate_grad_batches == 1
    assert cfg.model.optimizer.lr == pytest.approx(4e-3)
    assert "[t2i] global batch 32 = 8 per device x 4 devices x 1 accumulation steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="8 x 8 = 64"):
        apply_global_batch(compose_config(tiny_overrides(small_shapes, tmp_path, "global_batch_size=32")),
                           _trainer(devices=8))


def test_global_batch_through_train(small_shapes, tiny_vae_export, tmp_path, capsys):
    """The tiny LDM (automatic optimization, warm-up LR schedule, EMA), per-device batch 8, global batch 32 on one
    device: 4 batches per optimizer step, the lr scaled from its reference batch 8."""
    run = tmp_path / "run"
    train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, run, "global_batch_size=32",
                                            "lr_reference_batch=8", "trainer.max_steps=2", "final_validation=false",
                                            "export=false")))
    out = capsys.readouterr().out
    assert ("[t2i] global batch 32 = 8 per device x 1 devices x 4 accumulation steps; learning rates scaled by "
            "32/8: model.optimizer.lr 0.001 -> 0.004") in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["accumulate_grad_batches"] == 4
    assert config["model"]["optimizer"]["lr"] == pytest.approx(4e-3)

    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2  # optimizer steps ...
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batch"] == 8  # ... of 4 batches each
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 2  # once per optimizer step, not per batch
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert group["initial_lr"] == pytest.approx(4e-3)  # the lr the optimizer was built with
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(4e-3)]
    warmup = yaml.safe_load((run / "config.yaml").read_text())["model"]["lr_scheduler"]["warmup_steps"]
    assert group["lr"] == pytest.approx(4e-3 * min(1.0, 3 / warmup))  # warm-up factor after 2 steps
    assert all(int(s["step"]) == 2 for s in ckpt["optimizer_states"][0]["state"].values())


def test_without_global_batch_nothing_changes(small_shapes, tmp_path, capsys):
    cfg = compose_config(tiny_overrides(small_shapes, tmp_path, "trainer.accumulate_grad_batches=2"))
    trainer = _trainer(devices=1)
    trainer.accumulate_grad_batches = 2
    apply_global_batch(cfg, trainer)
    assert trainer.accumulate_grad_batches == 2 and cfg.model.optimizer.lr == pytest.approx(1e-3)
    out = capsys.readouterr().out
    assert "[t2i] global batch 16 = 8 per device x 1 devices x 2 accumulation steps\n" in out


def test_accumulation_is_refused_for_a_manually_optimized_stage(small_shapes, tmp_path):
    """The VAE steps its optimizers itself (GAN branch): a global batch needing accumulation is a clear error,
    raised before training and before the run folder's config is written."""
    run = tmp_path / "vae"
    with pytest.raises(ValueError, match=r"manual optimization.*data\.batch_size and more devices"):
        train(compose_config(tiny_overrides(small_shapes, run, "global_batch_size=32", "data.batch_size=8")))
    assert not (run / "config.yaml").exists()
