"""Stage configs of an older layout, read into today's, so that exports and runs written before a change of
layout still load (`t2i.exports.read_export` applies it to every export's ``model`` section).

Before the diffusion stage took config-built parts, the prior, decoder, upsampler and text-to-image stages were
subclasses (``t2i.stages.prior.PriorStage``, ...), and what are now parts were flat keys of ``model``:

=====================================  =========================================================
then                                   now
=====================================  =========================================================
``first_stage_export``, ``latents_from``  ``target: VaeLatents(export, precomputed)`` or ``Pixels``
``scale_fit_samples`` (prior)          ``target: ClipImageEmbedding(fit_samples)``
``low_res``, ``crop_size``             ``conditioner: LowRes(low_res, crop_size)``
``schedule``, ``prediction``, ...      ``objective: DiffusionObjective(schedule, prediction, ...)``
``val_sample_batches``, ``best_of``    ``preview: EmbeddingCosine(batches, best_of)``
=====================================  =========================================================
"""

from __future__ import annotations

import copy

STAGE = "t2i.stages.diffusion.DiffusionStage"
OLD_STAGES = {  # old _target_ -> (target, conditioner, preview) of today's layout
    "t2i.stages.text_to_image.TextToImageStage": ("Pixels", "Text", "PromptGrid"),
    "t2i.stages.prior.PriorStage": ("ClipImageEmbedding", "ClipText", "EmbeddingCosine"),
    "t2i.stages.decoder.DecoderStage": ("Pixels", "ClipImage", "DecoderGrid"),
    "t2i.stages.upsampler.UpsamplerStage": ("Pixels", "LowRes", "UpsamplerGrid"),
}
OBJECTIVE_KEYS = ("schedule", "prediction", "loss_weighting", "min_snr_gamma", "offset_noise", "min_snr_floor")


def is_old_layout(model: dict) -> bool:
    """A diffusion stage config of the layout before parts (a subclass, or flat objective keys)."""
    target = model.get("_target_")
    return target in OLD_STAGES or (target == STAGE and "objective" not in model)


def upgrade_model_config(model: dict) -> dict:
    """``model`` in today's layout (a copy; a config of today's layout, or of another stage, is returned as is)."""
    if not isinstance(model, dict) or not is_old_layout(model):
        return model
    old = copy.deepcopy(model)
    kind = old.pop("_target_")
    if kind == STAGE:  # the LDM: latents from its VAE, or pixels
        latents_from = old.pop("latents_from", "image" if old.get("first_stage_export") else "pixels")
        vae = old.pop("first_stage_export", None)
        target = ({"_target_": "t2i.stages.targets.Pixels"} if latents_from == "pixels" else
                  {"_target_": "t2i.stages.targets.VaeLatents", "export": vae, "precomputed": latents_from == "batch"})
        conditioner, preview = {"_target_": "t2i.stages.conditioners.Text", "size_embedding": 0}, "PromptGrid"
    else:
        target_name, conditioner_name, preview = OLD_STAGES[kind]
        old.pop("latents_from", None)
        old.pop("first_stage_export", None)
        target = {"_target_": f"t2i.stages.targets.{target_name}"}
        if target_name == "ClipImageEmbedding" and "scale_fit_samples" in old:
            target["fit_samples"] = old.pop("scale_fit_samples")
        conditioner = {"_target_": f"t2i.stages.conditioners.{conditioner_name}"}
        if conditioner_name == "Text":  # no size/crop conditioning before it existed
            conditioner["size_embedding"] = 0
        if conditioner_name == "LowRes":
            conditioner.update(low_res=old.pop("low_res"), crop_size=old.pop("crop_size", None))
    preview_node = {"_target_": f"t2i.stages.previews.{preview}"}
    if preview == "EmbeddingCosine":
        preview_node.update(batches=old.pop("val_sample_batches", 2), best_of=old.pop("best_of", 2))
    objective = {"_target_": "t2i.diffusion.objective.DiffusionObjective",
                 **{k: old.pop(k) for k in OBJECTIVE_KEYS if k in old}}
    return {"_target_": STAGE, **old, "target": target, "conditioner": conditioner, "objective": objective,
            "preview": preview_node}
