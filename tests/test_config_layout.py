"""Exports, run configs and checkpoints written before the diffusion stage took config-built parts still load:
`t2i.config_layout` reads the old flat layout (and the old stage subclasses) as today's."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from t2i_testing import (
    base_overrides,
    decoder_overrides,
    prior_overrides,
    sr_overrides,
    tiny_ldm_overrides,
    upsampler_overrides,
)

from t2i.cli.config import compose_config
from t2i.config_layout import upgrade_model_config
from t2i.exports import CONFIG, read_export
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline
from t2i.stages.diffusion import DiffusionStage

OLD = {"Text": "t2i.stages.text_to_image.TextToImageStage", "ClipText": "t2i.stages.prior.PriorStage",
       "ClipImage": "t2i.stages.decoder.DecoderStage", "LowRes": "t2i.stages.upsampler.UpsamplerStage"}


def old_layout(model: dict) -> dict:
    """``model`` as the stages before parts wrote it (written out here, independently of the upgrade)."""
    m = copy.deepcopy(model)
    target, conditioner, objective, preview = (m.pop(k) for k in ("target", "conditioner", "objective", "preview"))
    objective.pop("_target_")
    m.update(objective)
    target_kind, kind = target["_target_"].rsplit(".", 1)[1], conditioner["_target_"].rsplit(".", 1)[1]
    if target_kind == "VaeLatents":
        m.update(_target_="t2i.stages.diffusion.DiffusionStage", first_stage_export=target["export"],
                 latents_from="batch" if target["precomputed"] else "image")
        return m
    m["_target_"] = OLD[kind]
    if kind == "ClipText":
        m.update(scale_fit_samples=target["fit_samples"], val_sample_batches=preview["batches"],
                 best_of=preview["best_of"])
    if kind == "LowRes":
        m.update(low_res=conditioner["low_res"], crop_size=conditioner["crop_size"])
    return m


def composed_models(tmp, shapes, vae, clip) -> dict[str, dict]:
    kinds = {"ldm": tiny_ldm_overrides(shapes, vae, tmp),
             "ldm_precomputed": tiny_ldm_overrides(shapes, vae, tmp, "model.target.precomputed=true"),
             "prior": prior_overrides(tmp, shapes, clip), "decoder": decoder_overrides(tmp, shapes, clip),
             "upsampler": upsampler_overrides(tmp, shapes)}
    for system in ("imagen", "glide"):
        kinds[f"{system}_base"] = base_overrides(system, tmp, shapes, clip)
        kinds[f"{system}_sr"] = sr_overrides(system, tmp, shapes, clip)
    return {k: OmegaConf.to_container(compose_config(o).model, resolve=True) for k, o in kinds.items()}


def test_every_old_stage_layout_reads_as_todays(small_shapes, tiny_vae_export, tiny_clip_export, tmp_path):
    models = composed_models(tmp_path, small_shapes, tiny_vae_export, tiny_clip_export)
    for kind, model in models.items():
        assert model["_target_"] == "t2i.stages.diffusion.DiffusionStage", kind  # systems are configurations
        assert upgrade_model_config(model) is model, kind  # today's layout is left alone
        old = old_layout(model)
        assert "objective" not in old and upgrade_model_config(old) == model, kind
    stage = instantiate(upgrade_model_config(old_layout(models["upsampler"])))
    assert type(stage) is DiffusionStage and stage.conditioner.low_res == 16 and stage.conditioner.crop_size == 16


def test_an_export_of_the_old_layout_samples_as_before(tiny_ldm_export, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(tiny_ldm_export, old)
    config = yaml.safe_load((old / CONFIG).read_text())
    config["model"] = old_layout(config["model"])
    (old / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    assert read_export(old).config["model"] == read_export(tiny_ldm_export).config["model"]
    settings = SamplerSettings(steps=3, guidance_scale=2.0)
    images = [TextToImagePipeline.from_export(e)(["a red circle"], settings, seed=1) for e in (tiny_ldm_export, old)]
    assert torch.equal(images[0], images[1])


def test_a_checkpoint_with_the_vae_outside_the_target_loads(small_shapes, tiny_vae_export, tmp_path):
    """Checkpoints of the old layout hold the frozen VAE under ``first_stage.``, today's under ``target.``."""
    stage = instantiate(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path)).model)
    state = {k.removeprefix("target."): v.clone() for k, v in stage.state_dict().items()}
    assert any(k.startswith("first_stage.") for k in state)
    fresh = instantiate(compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path)).model)
    checkpoint = {"state_dict": state}
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in stage.state_dict().items())


def test_a_stage_part_that_cannot_take_the_denoiser_is_refused(small_shapes, tiny_clip_export, tmp_path):
    from hydra.errors import InstantiationException
    cfg = compose_config(upsampler_overrides(tmp_path, small_shapes, "~model.degradation"))
    with pytest.raises(InstantiationException, match="needs model.degradation"):
        instantiate(cfg.model)
    cfg = compose_config(prior_overrides(tmp_path, small_shapes, tiny_clip_export, "~model.embedding_scale"))
    with pytest.raises(InstantiationException, match="needs model.embedding_scale"):
        instantiate(cfg.model)


def test_an_override_of_a_moved_key_names_its_new_place():
    with pytest.raises(ValueError, match=r"model.first_stage_export is now model.target.export"):
        compose_config(["experiment=tiny/ldm", "model.first_stage_export=runs/vae/export"])
    with pytest.raises(ValueError, match=r"model.low_res is now model.conditioner.low_res"):
        compose_config(["experiment=tiny/upsampler", "model.low_res=32"])
