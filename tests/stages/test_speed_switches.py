"""The training-speed switches (compile, fused AdamW, channels_last, activation checkpointing) change how a
step runs, not what it computes: the tiny LDM stage trained through the real entry point ends at the same
weights with each of them as without, and the GPU experiments turn compile and fused on."""

import pytest
import torch
from t2i_testing import tiny_ldm_overrides

from t2i.cli.config import compose_config
from t2i.cli.train import train

STEPS = ("trainer.max_steps=3", "trainer.precision=bf16-mixed", "final_validation=false", "export=false", "model.ema_decay=0")


def trained_weights(small_shapes, tiny_vae_export, run_dir, *switches) -> dict[str, torch.Tensor]:
    result = train(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, run_dir, *STEPS, *switches)))
    return torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.usefixtures("single_thread")
def test_switches_train_to_the_same_weights(small_shapes, tiny_vae_export, tmp_path):
    plain = trained_weights(small_shapes, tiny_vae_export, tmp_path / "plain", "channels_last=false")
    fast = trained_weights(small_shapes, tiny_vae_export, tmp_path / "fast", "channels_last=true",
                           "compile.scope=blocks", "compile.backend=aot_eager", "model.optimizer.fused=true",
                           "model.denoiser.gradient_checkpointing=true")
    assert plain.keys() == fast.keys()  # compiled in place: checkpoints keep their names
    moved = 0
    for name, value in plain.items():
        if value.is_floating_point():
            torch.testing.assert_close(fast[name], value, rtol=1e-4, atol=2e-5, msg=name)
            moved += 0 if name.startswith("target.") else 1
    assert moved > 50


@pytest.mark.parametrize("experiment", ["ldm/ldm", "sd/v2", "imagen/base", "unclip/decoder"])
def test_gpu_experiments_compile_blocks_with_fused_adamw(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.compile.scope == "blocks"
    assert cfg.model.optimizer.fused is True


def test_compile_of_a_stage_without_denoiser_is_refused(small_shapes, tmp_path):
    from t2i_testing import tiny_overrides
    with pytest.raises(ValueError, match="no denoiser to compile"):
        train(compose_config(tiny_overrides(small_shapes, tmp_path / "vae", "compile.scope=blocks",
                                            "trainer.max_steps=1")))
