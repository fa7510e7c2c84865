"""An LDM stage export -> a diffusers ``StableDiffusionPipeline`` folder, or a single-file CompVis checkpoint.

:func:`export_diffusers` writes::

    <out>/model_index.json                StableDiffusionPipeline, its components (null where not written)
    <out>/unet/                           UNet2DConditionModel (t2i.interop.sd_unet_io.save_diffusers_unet)
    <out>/vae/                            AutoencoderKL, scaling_factor = the VAE export's latent scale
    <out>/scheduler/scheduler_config.json DDIMScheduler reproducing our schedule + parameterization
                                          (t2i.interop.scheduler, checked against make_schedule to 1e-6)
    <out>/text_encoder/, <out>/tokenizer/ transformers CLIPTextModel + CLIPTokenizer converted from the open_clip
                                          text tower: only when transformers is importable (the tower is
                                          converted, then loaded back and checked against ours)
    <out>/t2i_guidance.safetensors        the classifier-free-guidance null (negative_prompt_embeds)
    <out>/README.md                       what was written, what matches t2i exactly and what does not

open_clip -> CLIPTextModel (what diffusers' ``convert_open_clip_checkpoint`` does for SD 2's OpenCLIP-H):
``token_embedding`` -> ``text_model.embeddings.token_embedding``, ``positional_embedding`` ->
``...position_embedding.weight``, ``resblocks.i.attn.in_proj_{weight,bias}`` split into ``q/k/v_proj``,
``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_1/ln_2`` -> ``layer_norm1/2``, ``mlp.c_fc/c_proj`` ->
``mlp.fc1/fc2``, ``ln_final`` -> ``final_layer_norm``; ``text_projection`` is dropped (CLIPTextModel has none and
StableDiffusionPipeline uses only the token states). ``layer: penultimate`` (SD 2: ``ln_final`` applied to the
input of the last block) is written as SD 2 does: the last block is left out (``num_hidden_layers = layers - 1``),
so the model's ``last_hidden_state`` is our context.

:func:`export_single_file` writes one safetensors file in SD 2's CompVis layout: ``model.diffusion_model.*``
(our UNet names), ``first_stage_model.*`` (our VAE names) and ``cond_stage_model.model.*`` (the open_clip text
tower, all its layers), with our schedule, parameterization and text-encoder settings in the file's metadata.

Neither diffusers nor transformers is needed to write the UNet, VAE and scheduler; transformers is imported
lazily, only to write and check the text encoder and tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from t2i.interop.clip_text_export import (
    EOS,
    TEXT_ENCODER_CLASS,
    TOKENIZER_CLASS,
    DiffusersExportError,
    TextEncoderUnsupported,
    attends_to_padding,
    clip_pad_token,
    transformers_problem,
    write_text_encoder,
)
from t2i.interop.ldm_parts import LDMParts, load_ldm_parts
from t2i.interop.scheduler import (
    CONFIG_NAME as SCHEDULER_CONFIG_NAME,
)
from t2i.interop.scheduler import (
    SchedulerExport,
    ddim_timestep_mismatch,
    scheduler_export,
)
from t2i.interop.sd_unet import compvis_checkpoint_state_dict
from t2i.interop.sd_unet_io import save_diffusers_unet
from t2i.interop.sd_vae_compvis import prefix_compvis_vae_state_dict
from t2i.interop.sd_vae_io import save_diffusers_vae

PIPELINE_CLASS = "StableDiffusionPipeline"
GUIDANCE_FILE = "t2i_guidance.safetensors"
COMPVIS_TEXT_PREFIX = "cond_stage_model.model."
_CHECK_STEPS = (10, 20, 25, 50, 100)
STEPS_OFFSET_NOTE = ("StableDiffusionPipeline.__init__ rewrites the scheduler's steps_offset to 1 (a legacy SD 1 fix; "
                     "its FutureWarning says so), which shifts 'leading' timesteps by one from t2i's: after loading, "
                     "set pipe.scheduler = DDIMScheduler.from_pretrained(<folder>, subfolder='scheduler')")


# ---- classifier-free guidance null -------------------------------------------------------------------------------
def guidance_null(parts: LDMParts) -> tuple[dict[str, torch.Tensor], str]:
    """The unconditional context our pipeline uses for guidance, as tensors for ``t2i_guidance.safetensors``,
    and how to pass it to diffusers (``negative_prompt_embeds``)."""
    from t2i.conditioning.cond import Cond

    dropout = parts.cond_dropout
    width = int(parts.unet_kwargs.get("context_dim") or 0)
    if not getattr(dropout, "p", None) or "context" not in dropout.p:
        return {}, ("the stage was trained without caption dropout: t2i samples it without guidance (guidance_scale "
                    "is ignored); use guidance_scale=1 in diffusers")
    length = 1 + int(getattr(dropout, "null_context", torch.zeros(1, width)).shape[0])
    probe = Cond(context=torch.zeros(1, length, width), context_mask=torch.ones(1, length, dtype=torch.bool))
    with torch.no_grad():
        null = dropout.null_like(probe)
    tokens = null.context[0][null.context_mask[0]]
    identical = bool((tokens == tokens[:1]).all())
    how = ("negative_prompt_embeds = null_context[:1].expand(B, n, D) (n = the prompt_embeds' length): attending to "
           "n copies of one token equals attending to it once, so this reproduces t2i's guidance exactly"
           if identical else
           "the null has several different tokens that t2i attends with a mask: diffusers cannot reproduce t2i's "
           "guidance exactly (negative_prompt_embeds must have the prompt's shape and no mask is passed)")
    return {"null_context": tokens.detach().float().contiguous()}, how


# ---- the diffusers folder ----------------------------------------------------------------------------------------
@dataclass
class DiffusersExport:
    folder: Path
    text_encoder_written: bool
    text_encoder_note: str | None  # why it was not written (or the check's difference when it was)
    scheduler: SchedulerExport
    timestep_notes: list[str]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _model_index(text: bool) -> dict[str, Any]:
    from t2i.interop.scheduler import diffusers_version

    te = ["transformers", TEXT_ENCODER_CLASS] if text else [None, None]
    tok = ["transformers", TOKENIZER_CLASS] if text else [None, None]
    return {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers_version(),
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": te,
            "tokenizer": tok, "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _prepare_out(out: Path) -> Path:
    if out.exists() and not (out / "model_index.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DiffusersExportError(f"{out} exists and is not a diffusers folder written before: refusing to replace "
                                   f"it (give a new or empty folder)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _replace(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_diffusers(export_dir: str | Path, out: str | Path, *, vae_export: str | Path | None = None,
                     spacing: str | None = None, text_encoder: str = "auto", verify: bool = True) -> DiffusersExport:
    """Write the StableDiffusionPipeline folder `out` for the LDM stage export `export_dir` (see the module
    docstring). `spacing`: the DDIM timestep spacing to reproduce (default: the export's ``model.sampler.spacing``,
    else "leading"). `text_encoder`: "auto" (written when transformers is importable and CLIPTextModel can hold
    the tower) or "skip". The folder is written atomically (a previous diffusers export there is replaced)."""
    if text_encoder not in ("auto", "skip"):
        raise ValueError(f"text_encoder must be 'auto' or 'skip', got {text_encoder!r}")
    parts = load_ldm_parts(export_dir, vae_export)
    out = Path(out)
    spacing = spacing or parts.sampler.get("spacing", "leading")
    sched = scheduler_export(parts.schedule, parts.prediction, spacing=spacing)
    warnings: list[str] = []
    if not sched.exact:
        warnings.append(f"the scheduler's alphas_cumprod differ from t2i's by up to {sched.max_abs_error:.2e}")
    steps = sorted({*_CHECK_STEPS, int(parts.sampler.get("steps", 50))} & set(range(1, parts.schedule["T"] + 1)))
    timestep_notes = [m for n in steps if (m := ddim_timestep_mismatch(sched.config, n, spacing))]
    if timestep_notes:
        warnings.append(f"diffusers' DDIM does not visit t2i's {spacing!r} timesteps for some step counts: "
                        + "; ".join(timestep_notes[:3]))
    size_embedding = int((parts.config["model"].get("conditioner") or {}).get("size_embedding", 0))
    if size_embedding:
        warnings.append(f"the UNet takes SDXL's size/crop micro-conditioning ({size_embedding} features per number, "
                        f"after any pooled text embedding in its vector): diffusers holds the vector's projection as a "
                        f"'projection' class embedding, which StableDiffusionPipeline does not feed; pass "
                        f"class_labels = [pooled, t2i.conditioning.size_crop.size_crop_embedding(ids)] yourself (the "
                        f"same network as diffusers' addition_embed_type='text_time' with add_embedding = "
                        f"class_embedding)")
    elif parts.unet_kwargs.get("vector_dim"):
        warnings.append("the UNet takes the pooled text embedding (vector_dim): diffusers holds it as a 'projection' "
                        "class embedding, which StableDiffusionPipeline does not feed (pass class_labels yourself)")

    tmp = _prepare_out(out)
    try:
        save_diffusers_unet(parts.unet, parts.unet_kwargs, tmp / "unet", sample_size=parts.latent_size)
        save_diffusers_vae(parts.vae, parts.vae_kwargs, parts.latent_scale, tmp / "vae",
                           sample_size=parts.image_size)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / SCHEDULER_CONFIG_NAME).write_text(json.dumps(sched.config, indent=2) + "\n",
                                                               encoding="utf-8")
        written, note = False, None
        if text_encoder == "skip":
            note = "skipped (text_encoder=skip)"
        elif parts.text_encoder is None:
            note = parts.text_encoder_problem
        elif (problem := transformers_problem()) is not None:
            note = (f"{problem}: the text encoder (a transformers CLIPTextModel) and tokenizer are written only where "
                    f"transformers can load them back to check the conversion")
        else:
            try:
                diff = write_text_encoder(parts.text_encoder, tmp, verify=verify)
                written = True
                note = None if diff is None else f"checked: token states within {diff:.1e} of t2i's text encoder"
            except TextEncoderUnsupported as e:
                shutil.rmtree(tmp / "text_encoder", ignore_errors=True)
                shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
                note = f"transformers' CLIPTextModel cannot hold this open_clip tower: {e}"
            except DiffusersExportError as e:  # the converted encoder, loaded back, is not ours: leave it out
                shutil.rmtree(tmp / "text_encoder", ignore_errors=True)
                shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
                note = f"the converted CLIPTextModel/CLIPTokenizer failed the check against t2i's encoder: {e}"
        if not written:
            warnings.insert(0, f"text encoder NOT written: {note}. model_index.json has text_encoder/tokenizer null: "
                               f"load with StableDiffusionPipeline.from_pretrained(folder, text_encoder=None, "
                               f"tokenizer=None) and pass prompt_embeds from t2i's text encoder (README.md)")
        null_tensors, null_how = guidance_null(parts)
        if null_tensors:
            from safetensors.torch import save_file

            save_file(null_tensors, str(tmp / GUIDANCE_FILE), metadata={"format": "pt"})
        (tmp / "model_index.json").write_text(json.dumps(_model_index(written), indent=2) + "\n", encoding="utf-8")
        notes = []
        if spacing == "leading":
            notes.append(STEPS_OFFSET_NOTE)
        result = DiffusersExport(out, written, note, sched, timestep_notes, warnings, notes)
        (tmp / "README.md").write_text(_readme(parts, result, spacing, null_how, bool(null_tensors)), encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _readme(parts: LDMParts, r: DiffusersExport, spacing: str, null_how: str, has_null: bool) -> str:
    c = r.scheduler.config
    if r.scheduler.named:
        sched_line = f"`beta_schedule: {c['beta_schedule']}`"
        if c["beta_schedule"] != "squaredcos_cap_v2":
            sched_line += f" (`beta_start: {c['beta_start']}`, `beta_end: {c['beta_end']}`)"
    else:
        sched_line = "explicit `trained_betas`"
    s = parts.schedule
    masked = not attends_to_padding(parts.text_encoder)
    lines = [
        f"# {parts.export_dir.name}: a t2i LDM stage as a diffusers {PIPELINE_CLASS}", "",
        (f"Written by `python -m t2i.cli.export format=diffusers` from the t2i export `{parts.export_dir}` "
        f"(VAE export `{parts.vae_dir}`)."), "",
        "## Contents", "",
        f"- `unet/`: UNet2DConditionModel, {parts.latent_size}x{parts.latent_size} latents.",
        (f"- `vae/`: AutoencoderKL, {parts.image_size}px images, `scaling_factor` {parts.latent_scale:.6g} (the VAE "
        f"export's latent scale)."),
        (f"- `scheduler/`: DDIMScheduler with {sched_line}, `rescale_betas_zero_snr: "
        f"{str(c['rescale_betas_zero_snr']).lower()}`, `prediction_type: {c['prediction_type']}`, `timestep_spacing: "
        f"{c['timestep_spacing']}`, `steps_offset: 0`, `set_alpha_to_one: true`, `clip_sample: false`; t2i trained "
        f"with kind={s['kind']}, T={s['T']}, zero_terminal_snr={s['zero_terminal_snr']}, "
        f"prediction={parts.prediction}. Its alphas_cumprod are within {r.scheduler.max_abs_error:.1e} of t2i's "
        f"({'float32 rounding' if r.scheduler.exact else 'MORE than 1e-6'})."),
    ]
    if r.text_encoder_written:
        pad = clip_pad_token(parts.text_encoder)
        pad_line = (f"pads with `{EOS}` (t2i pads with id 0 = `!` but masks the padding out, so it does not matter, "
                    f"and every `!` of a prompt stays an ordinary token)" if pad == EOS else
                    "pads with `!` (id 0) as open_clip does; like diffusers' SD 2 tokenizer it then also reads a `!` "
                    "in a prompt as that token, where open_clip's BPE gives `!</w>`")
        lines.append(f"- `text_encoder/`, `tokenizer/`: transformers CLIPTextModel / CLIPTokenizer converted from the "
                     f"open_clip text tower ({r.text_encoder_note or 'not re-checked'}); "
                     f"{parts.text_encoder.context_length} tokens, the tokenizer {pad_line}.")
    else:
        lines += [(f"- **No text encoder or tokenizer**: {r.text_encoder_note}. `model_index.json` says `null` for "
                  "them: load with `StableDiffusionPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)` "
                  "and pass `prompt_embeds` computed by t2i (below), or install transformers and export again (the "
                  "open_clip tower is then converted to a CLIPTextModel and written with its tokenizer). diffusers' "
                  "StableDiffusionPipeline class itself needs transformers installed; without it, run the components "
                  "(`UNet2DConditionModel`, `AutoencoderKL`, `DDIMScheduler`) in the loop below.")]
    if has_null:
        lines.append(f"- `{GUIDANCE_FILE}`: `null_context`, the unconditional (caption-dropout) context t2i guides "
                     f"with: {null_how}.")
    lines += [
        "", "## What reproduces t2i exactly, and what does not", "",
        "- DDIM timesteps: " + (f"diffusers' DDIM visits t2i's `{spacing}` timesteps for 10, 20, 25, 50 and 100 steps "
                                "and the export's own step count." if not r.timestep_notes else
                                "differ from t2i's for: " + "; ".join(r.timestep_notes) + "."),
        *[f"- {note}." for note in r.notes],
        ("- Padding: t2i's UNet was trained with the text padding after the end-of-text token masked out of "
         "cross-attention; StableDiffusionPipeline passes no mask, so from padded prompt states (its own "
         "tokenizer + text encoder, or padded `prompt_embeds`) its images differ from t2i's. For identical images "
         "pass `prompt_embeds = context[:, :n]`, n = the number of real tokens (`context_mask.sum()`; one prompt per "
         "call, or prompts of one token length), or call the UNet with `encoder_attention_mask=context_mask`."
         if masked else "- Padding: the UNet attends to every token state, padding included, as "
         "StableDiffusionPipeline does."),
        ("- Classifier-free guidance: t2i's unconditional input is the null above, not the empty prompt's "
         "encoding: pass it as `negative_prompt_embeds`." if has_null else f"- Classifier-free guidance: {null_how}."),
    ]
    if r.warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in r.warnings]]
    lines += ["", "## Loading", "", "```python",
              f"from diffusers import DDIMScheduler, {PIPELINE_CLASS}", "from safetensors.torch import load_file",
              "from t2i.pipelines.text_to_image import TextToImagePipeline", "",
              f"folder = '{r.folder}'",
              f"pipe = {PIPELINE_CLASS}.from_pretrained(folder"
              + (")" if r.text_encoder_written else ", text_encoder=None, tokenizer=None)"),
              "pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder='scheduler')  # keep steps_offset 0",
              f"t2i = TextToImagePipeline.from_export('{parts.export_dir}')",
              "cond = t2i.condition(['a prompt'])",
              "context = cond.context[:, :int(cond.context_mask.sum())]  # cut at the end-of-text token"]
    if has_null:
        lines += [f"null = load_file(folder + '/{GUIDANCE_FILE}')['null_context'][:1]",
                  "negative = null[None].expand(1, context.shape[1], -1)",
                  "image = pipe(prompt_embeds=context, negative_prompt_embeds=negative, guidance_scale=3.0,"]
    else:
        lines += ["image = pipe(prompt_embeds=context, guidance_scale=1.0,"]
    lines += [f"             num_inference_steps=50, height={parts.image_size}, width={parts.image_size}).images[0]",
              "```", "", "The same denoising loop with the components alone (no transformers needed; guidance 1):", "",
              "```python", "import torch", "from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel",
              "", "unet = UNet2DConditionModel.from_pretrained(folder, subfolder='unet')",
              "vae = AutoencoderKL.from_pretrained(folder, subfolder='vae')",
              "scheduler = DDIMScheduler.from_pretrained(folder, subfolder='scheduler')",
              "scheduler.set_timesteps(50)",
              f"latents = torch.randn(1, {parts.unet.in_channels}, {parts.latent_size}, {parts.latent_size})",
              "with torch.no_grad():", "    for t in scheduler.timesteps:",
              "        out = unet(latents, t, encoder_hidden_states=cond.context,",
              "                   encoder_attention_mask=cond.context_mask).sample",
              "        latents = scheduler.step(out, t, latents).prev_sample",
              "    image = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)  # in [-1, 1]",
              "```", ""]
    return "\n".join(lines)


# ---- single file -------------------------------------------------------------------------------------------------
@dataclass
class SingleFileExport:
    path: Path
    num_tensors: int
    text_encoder_written: bool
    warnings: list[str] = field(default_factory=list)


def single_file_state_dict(parts: LDMParts) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The SD 2 CompVis layout of `parts`: ``model.diffusion_model.*``, ``first_stage_model.*`` and, for an
    open_clip text tower, ``cond_stage_model.model.*``; and warnings (what was left out)."""
    sd = dict(compvis_checkpoint_state_dict(parts.unet.state_dict()))
    sd.update(prefix_compvis_vae_state_dict(parts.vae.state_dict()))
    warnings = []
    tower = getattr(parts.text_encoder, "tower", None)
    if tower is not None:
        sd.update({COMPVIS_TEXT_PREFIX + k: v for k, v in tower.state_dict().items()})
    else:
        warnings.append(f"text encoder NOT written: {parts.text_encoder_problem or 'not an open_clip tower'}")
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, warnings


def export_single_file(export_dir: str | Path, out_file: str | Path, *, vae_export: str | Path | None = None,
                       spacing: str | None = None) -> SingleFileExport:
    """Write the LDM stage export as one SD 2-layout safetensors file (see the module docstring); its metadata
    holds ``t2i`` (schedule, prediction, image size, latent scale, text encoder settings) and ``scheduler_config``
    (the DDIMScheduler config of :func:`export_diffusers`)."""
    from safetensors.torch import save_file

    parts = load_ldm_parts(export_dir, vae_export)
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise DiffusersExportError(f"single-file export {out_file}: the file name must end in .safetensors")
    sd, warnings = single_file_state_dict(parts)
    spacing = spacing or parts.sampler.get("spacing", "leading")
    text_node = (parts.config.get("model") or {}).get("text_encoder") or {}
    info = {"source": str(parts.export_dir), "vae_export": str(parts.vae_dir), "schedule": parts.schedule,
            "prediction": parts.prediction, "image_size": parts.image_size, "latent_scale": parts.latent_scale,
            "unet": _jsonable(parts.unet_kwargs),
            "text_encoder": {k: _jsonable(v) for k, v in text_node.items()
                             if k in ("_target_", "arch", "layer", "penultimate_ln", "context_length", "width",
                                      "layers", "heads", "output_dim")}}
    metadata = {"format": "pt", "t2i": json.dumps(info),
                "scheduler_config": json.dumps(scheduler_export(parts.schedule, parts.prediction,
                                                                spacing=spacing).config)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    tmp.replace(out_file)
    return SingleFileExport(out_file, len(sd), any(k.startswith(COMPVIS_TEXT_PREFIX) for k in sd), warnings)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
