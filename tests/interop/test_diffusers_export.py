"""LDM stage export -> diffusers StableDiffusionPipeline folder / SD single file (t2i.interop.diffusers_export),
and our schedule as a DDIMScheduler config (t2i.interop.scheduler).

The tiny LDM and VAE session exports (trained 2 steps) get every weight re-drawn at random, so that zero-initialised
output layers cannot make a comparison trivial; variants of the LDM export differ only in their config (schedule,
parameterization, DDIM spacing, text layer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from t2i.diffusion.samplers import timesteps as t2i_timesteps
from t2i.diffusion.schedule import make_schedule
from t2i.exports import read_export, write_export
from t2i.interop import diffusers_export, sd_unet, sd_vae, sd_vae_compvis, sd_vae_io
from t2i.interop.clip_text_export import (
    TextEncoderUnsupported,
    clip_text_model_from_open_clip,
    clip_tokenizer_files,
)
from t2i.interop.diffusers_export import export_diffusers, export_single_file
from t2i.interop.scheduler import (
    ddim_timestep_mismatch,
    diffusers_alphas_cumprod,
    scheduler_export,
)
from t2i.pipelines.sampling import SamplerSettings
from t2i.pipelines.text_to_image import TextToImagePipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

PROMPTS = ["a large red circle in the top left on a white background", "a small blue square"]
STEPS = 5
LATENT_SCALE = 0.7
VARIANTS = {
    # (schedule, prediction, DDIM spacing, text layer)
    "linear_eps": ({"kind": "linear", "T": 1000, "zero_terminal_snr": False}, "eps", "leading", "last"),
    "scaled_ztsnr_v": ({"kind": "scaled_linear", "T": 1000, "zero_terminal_snr": True}, "v", "trailing", "last"),
    "cosine_x0": ({"kind": "cosine", "T": 1000, "zero_terminal_snr": False}, "x0", "leading", "penultimate"),
}


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor re-drawn: matrices N(0, 1/fan_in), norm gains N(1, 0.1²), the rest N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in sd.items():
        noise = torch.randn(value.shape, generator=gen)
        if value.ndim > 1:
            out[name] = noise / math.sqrt(value[0].numel())
        elif name.endswith("weight"):
            out[name] = 1 + 0.1 * noise
        else:
            out[name] = 0.1 * noise
    return out


@pytest.fixture(scope="module")
def exports(tiny_ldm_export, tiny_vae_export, tmp_path_factory) -> dict[str, Path]:
    """{variant: a randomized LDM export} sharing one randomized VAE export (latent scale 0.7)."""
    root = tmp_path_factory.mktemp("diffusers_export")
    vae = read_export(tiny_vae_export)
    vae_dir = write_export(root / "vae", vae.stage, randomized(vae.state_dict(), 0), vae.config,
                           metrics={**vae.metrics, "latent_scale": LATENT_SCALE})
    ldm = read_export(tiny_ldm_export)
    weights = randomized(ldm.state_dict(), 1)
    out = {}
    for name, (schedule, prediction, spacing, layer) in VARIANTS.items():
        config = yaml.safe_load(yaml.safe_dump(ldm.config))
        model = config["model"]
        model["target"]["export"] = str(vae_dir)
        model["objective"].update(schedule=schedule, prediction=prediction)
        model["sampler"] = {**model.get("sampler", {}), "spacing": spacing}
        model["text_encoder"]["layer"] = layer
        out[name] = write_export(root / name, ldm.stage, weights, config, metrics=ldm.metrics)
    return out


@pytest.fixture(scope="module")
def folders(exports, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers_folders")
    return {name: export_diffusers(path, root / name).folder for name, path in exports.items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def noise_for(seed: int = 3, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- unet/ and vae/ --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_unet_and_vae_load_in_diffusers_and_match(exports, folders):
    pipe = TextToImagePipeline.from_export(exports["linear_eps"])
    unet = UNet2DConditionModel.from_pretrained(folders["linear_eps"] / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folders["linear_eps"] / "vae").eval()
    cond = pipe.condition(PROMPTS)
    x, t = noise_for(), torch.tensor([17, 901])
    ours = pipe.net["denoiser"](x, t, context=cond.context, context_mask=cond.context_mask)
    theirs = unet(x, t, encoder_hidden_states=cond.context, encoder_attention_mask=cond.context_mask).sample
    assert ours.abs().mean() > 0.1  # random weights: a non-trivial output
    assert max_diff(ours, theirs) <= 1e-5
    unmasked = unet(x, t, encoder_hidden_states=cond.context).sample
    assert max_diff(pipe.net["denoiser"](x, t, context=cond.context), unmasked) <= 1e-5

    assert vae.config.scaling_factor == pytest.approx(LATENT_SCALE)
    ae = pipe.first_stage.autoencoder
    z = noise_for(4)
    assert max_diff(ae.decode(z), vae.decode(z).sample) <= 1e-5
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert max_diff(ae.encode(images).mode(), vae.encode(images).latent_dist.mode()) <= 1e-5
    assert unet.config.sample_size == 8 and vae.config.sample_size == 32


# ---- scheduler/ ------------------------------------------------------------------------------------------------
SCHEDULES = {
    "linear": ({"kind": "linear", "T": 1000}, "eps", "leading", "linear"),
    "scaled_linear": ({"kind": "scaled_linear", "T": 1000}, "eps", "leading", "scaled_linear"),
    "cosine": ({"kind": "cosine", "T": 1000}, "x0", "leading", "squaredcos_cap_v2"),
    "zero_terminal_snr": ({"kind": "scaled_linear", "T": 1000, "zero_terminal_snr": True}, "v", "trailing",
                          "scaled_linear"),
    "linear_zero_snr_T500": ({"kind": "linear", "T": 500, "zero_terminal_snr": True}, "x0", "leading", "linear"),
    "cosine_custom_s": ({"kind": "cosine", "T": 1000, "s": 0.02}, "eps", "leading", None),  # -> trained_betas
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scheduler_reproduces_our_schedule_and_timesteps(name, tmp_path):
    schedule, prediction, spacing, beta_schedule = SCHEDULES[name]
    config = scheduler_export(schedule, prediction, spacing=spacing).config
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    sched = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    ours = make_schedule(**schedule)
    assert max_diff(sched.alphas_cumprod, ours) <= 1e-6
    assert torch.equal(diffusers_alphas_cumprod(config).float(), sched.alphas_cumprod)  # our replay is diffusers'
    if beta_schedule is None:
        assert config["trained_betas"] is not None
    else:
        assert config["beta_schedule"] == beta_schedule and config["trained_betas"] is None
    assert config["rescale_betas_zero_snr"] == bool(schedule.get("zero_terminal_snr"))
    assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    assert sched.config.set_alpha_to_one and not sched.config.clip_sample and sched.config.steps_offset == 0
    T = schedule["T"]
    for steps in (1, 4, 10, 50, 250):
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == t2i_timesteps(T, steps, spacing).tolist(), steps
        assert ddim_timestep_mismatch(config, steps) is None


def test_scheduler_reports_timesteps_it_cannot_reproduce():
    config = scheduler_export({"kind": "linear"}, "eps", spacing="linspace").config
    assert "t - T//N" in ddim_timestep_mismatch(config, 10)
    trailing = scheduler_export({"kind": "linear"}, "eps", spacing="trailing").config
    assert ddim_timestep_mismatch(trailing, 20) is None and ddim_timestep_mismatch(trailing, 3) is not None
    with pytest.raises(ValueError, match="prediction"):
        scheduler_export({"kind": "linear"}, "epsilon")


# ---- DDIM sampling: ours vs the diffusers loop (what StableDiffusionPipeline runs) -------------------------------
@torch.no_grad()
def diffusers_sample(folder: Path, context: torch.Tensor, mask: torch.Tensor | None, noise: torch.Tensor,
                     guidance: float = 1.0, negative: torch.Tensor | None = None) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop (negative first, then the prompt) and VAE decode, in [-1, 1]."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(STEPS)
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        if guidance != 1.0:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(inp, t, encoder_hidden_states=torch.cat([negative, context])).sample
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = unet(sched.scale_model_input(latents, t), t, encoder_hidden_states=context,
                       encoder_attention_mask=mask).sample
        latents = sched.step(out, t, latents, eta=0.0).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_ddim_sampling_agrees_with_diffusers(name, exports, folders):
    pipe = TextToImagePipeline.from_export(exports[name])
    spacing = VARIANTS[name][2]
    noise = noise_for()
    ours = pipe(PROMPTS, SamplerSettings(steps=STEPS, guidance_scale=1.0, spacing=spacing), noise=noise)
    assert ours.std() > 0.05
    cond = pipe.condition(PROMPTS)
    # the batch, with the padding masked as t2i's UNet saw it
    masked = diffusers_sample(folders[name], cond.context, cond.context_mask, noise)
    assert max_diff(ours, masked) <= 1e-4
    # one prompt at a time, its states cut at the end-of-text token, no mask: exactly StableDiffusionPipeline
    for i in range(len(PROMPTS)):
        n = int(cond.context_mask[i].sum())
        cut = diffusers_sample(folders[name], cond.context[i:i + 1, :n], None, noise[i:i + 1])
        assert max_diff(ours[i:i + 1], cut) <= 1e-4


@torch.no_grad()
def test_guided_sampling_with_the_exported_null(exports, folders):
    pipe = TextToImagePipeline.from_export(exports["linear_eps"])
    noise = noise_for(7)
    ours = pipe(PROMPTS, SamplerSettings(steps=STEPS, guidance_scale=3.0), noise=noise)
    null = load_file(folders["linear_eps"] / "t2i_guidance.safetensors")["null_context"]
    assert null.shape == (1, 32)
    cond = pipe.condition(PROMPTS)
    for i in range(len(PROMPTS)):
        n = int(cond.context_mask[i].sum())
        negative = null[:1][None].expand(1, n, -1)
        theirs = diffusers_sample(folders["linear_eps"], cond.context[i:i + 1, :n], None, noise[i:i + 1], 3.0,
                                  negative)
        assert max_diff(ours[i:i + 1], theirs) <= 1e-4


def load_sd_pipeline(folder: Path, **kwargs):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs)
    sd.set_progress_bar_config(disable=True)
    # StableDiffusionPipeline.__init__ rewrites a scheduler's steps_offset to 1 (a legacy SD 1 fix): t2i's
    # "leading" timesteps need the written 0 back, by setting the scheduler after construction
    sd.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    return sd


@torch.no_grad()
def test_stable_diffusion_pipeline_from_pretrained(exports, tmp_path):
    from transformers import CLIPTextModel  # the dev extra's: missing, this fails instead of skipping

    result = export_diffusers(exports["cosine_x0"], tmp_path / "sd")
    assert result.text_encoder_written, result.text_encoder_note
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    sd = load_sd_pipeline(tmp_path / "sd")
    assert isinstance(sd.text_encoder, CLIPTextModel)
    pipe = TextToImagePipeline.from_export(exports["cosine_x0"])
    cond = pipe.condition(PROMPTS)
    # the pipeline's own tokenizer + text encoder give our context (penultimate layer + ln_final) at every token
    # t2i's UNet sees (it pads with <|endoftext|>, t2i with "!": the padding, which t2i masks out, differs)
    assert sd.tokenizer.pad_token == "<|endoftext|>"
    embeds = sd.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert max_diff(embeds[cond.context_mask], cond.context[cond.context_mask]) <= 1e-5
    noise = noise_for(9)
    ours = pipe(PROMPTS, SamplerSettings(steps=STEPS, guidance_scale=1.0), noise=noise)
    for i in range(len(PROMPTS)):
        n = int(cond.context_mask[i].sum())
        image = sd(prompt_embeds=cond.context[i:i + 1, :n], guidance_scale=1.0, num_inference_steps=STEPS,
                   latents=noise[i:i + 1], height=32, width=32, output_type="pt").images
        assert max_diff((ours[i:i + 1] + 1) / 2, image) <= 1e-4


@torch.no_grad()
def test_stable_diffusion_pipeline_without_text_encoder_and_guided(exports, tmp_path):
    import transformers  # noqa: F401  StableDiffusionPipeline needs it (dev extra): missing, this fails by name

    export_diffusers(exports["linear_eps"], tmp_path / "sd", text_encoder="skip")
    sd = load_sd_pipeline(tmp_path / "sd", text_encoder=None, tokenizer=None)
    pipe = TextToImagePipeline.from_export(exports["linear_eps"])
    cond = pipe.condition(PROMPTS)
    null = load_file(tmp_path / "sd" / "t2i_guidance.safetensors")["null_context"][:1]
    noise = noise_for(11)
    ours = pipe(PROMPTS, SamplerSettings(steps=STEPS, guidance_scale=3.0), noise=noise)
    for i in range(len(PROMPTS)):
        n = int(cond.context_mask[i].sum())
        image = sd(prompt_embeds=cond.context[i:i + 1, :n], negative_prompt_embeds=null[None].expand(1, n, -1),
                   guidance_scale=3.0, num_inference_steps=STEPS, latents=noise[i:i + 1], height=32, width=32,
                   output_type="pt").images
        assert max_diff((ours[i:i + 1] + 1) / 2, image) <= 1e-4


# ---- text tower conversion (pure; transformers only checks it when importable) -----------------------------------
def test_open_clip_tower_to_clip_text_model_keys(exports):
    pipe = TextToImagePipeline.from_export(exports["cosine_x0"])  # penultimate layer
    encoder = pipe.net["text_encoder"]
    config, state = clip_text_model_from_open_clip(encoder)
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 32 and config["max_position_embeddings"] == 32
    assert config["hidden_act"] == "gelu" and config["intermediate_size"] == 128
    qkv = encoder.tower.transformer.resblocks[0].attn.in_proj_weight
    assert torch.equal(torch.cat([state[f"text_model.encoder.layers.0.self_attn.{p}_proj.weight"]
                                  for p in "qkv"]), qkv)
    assert not any(k.startswith("text_model.encoder.layers.1.") for k in state)
    files = clip_tokenizer_files(encoder)
    vocab = json.loads(files["vocab.json"])
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(files["merges.txt"].strip().split("\n")) == 1 + 48894
    assert json.loads(files["tokenizer_config.json"])["model_max_length"] == 32
    encoder.penultimate_ln = False
    with pytest.raises(TextEncoderUnsupported, match="penultimate_ln"):
        clip_text_model_from_open_clip(encoder)


def test_frozen_clip_export_tower_converts(tiny_clip_export, tmp_path):
    """A frozen tower (here a CLIP stage export's, 1 layer, 24 positions, MLP ratio 2) converts the same way, and
    the written CLIPTextModel + CLIPTokenizer are loaded back and compared."""
    from t2i.conditioning.text import OpenClipTextEncoder

    encoder = OpenClipTextEncoder.from_clip_export(tiny_clip_export)
    config, state = clip_text_model_from_open_clip(encoder)
    assert (config["num_hidden_layers"], config["max_position_embeddings"], config["intermediate_size"]) == (1, 24, 64)
    assert len(state) == 4 + 16
    problem = diffusers_export.transformers_problem()
    assert problem is None, problem  # transformers is the dev extra's: the check below must run
    assert diffusers_export.write_text_encoder(encoder, tmp_path) <= 1e-5
    assert (tmp_path / "tokenizer" / "vocab.json").is_file()


def test_without_transformers_the_text_encoder_is_left_out_and_said(exports, tmp_path, monkeypatch, capsys):
    from t2i.cli.export import main

    if diffusers_export.transformers_problem() is None:  # installed here: make it look absent
        monkeypatch.setattr(diffusers_export, "transformers_problem",
                            lambda: "transformers is not importable (ModuleNotFoundError: hidden by the test)")
    out = tmp_path / "pipe"
    main(["format=diffusers", f"export={exports['linear_eps']}", f"out={out}"])
    printed = capsys.readouterr().out
    assert "text encoder NOT written" in printed and "transformers is not importable" in printed
    assert f"folder written to {out}" in printed and "beta_schedule=linear" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not (out / "text_encoder").exists() and not (out / "tokenizer").exists()
    assert {p.name for p in out.iterdir()} >= {"unet", "vae", "scheduler", "model_index.json", "README.md"}
    readme = (out / "README.md").read_text()
    assert "No text encoder or tokenizer" in readme and "transformers" in readme and "prompt_embeds" in readme
    # a second export replaces the folder; a folder that is not one is refused
    main(["format=diffusers", f"export={exports['linear_eps']}", f"out={out}", "text_encoder=skip"])
    assert "skipped" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="refusing to replace"):
        main(["format=diffusers", f"export={exports['linear_eps']}", f"out={tmp_path / 'other'}"])


# ---- single file ---------------------------------------------------------------------------------------------
def test_single_file_round_trips_through_the_compvis_readers(exports, tmp_path):
    path = export_single_file(exports["scaled_ztsnr_v"], tmp_path / "model.safetensors").path
    sd = load_file(path)
    export = read_export(exports["scaled_ztsnr_v"])
    ours = export.state_dict()
    kwargs = {k: v for k, v in export.config["model"]["denoiser"].items() if k != "_target_"}
    unet = sd_unet.compvis_unet_state_dict(sd, kwargs)
    assert unet.keys() == {k[len("denoiser."):] for k in ours if k.startswith("denoiser.")}
    assert all(torch.equal(v, ours["denoiser." + k]) for k, v in unet.items())
    vae_model, vae_kwargs, _ = sd_vae_io.read_vae_export(export.config["model"]["target"]["export"])
    vae = sd_vae_compvis.compvis_vae_state_dict(sd)
    sd_vae.check_t2i_vae_state_dict(vae, vae_kwargs)
    assert all(torch.equal(v, vae_model.state_dict()[k]) for k, v in vae.items())
    text = {k[len("cond_stage_model.model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.model.")}
    assert text and all(torch.equal(v, ours["text_encoder.tower." + k]) for k, v in text.items())
    assert len(sd) == len(unet) + len(vae) + len(text)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    info, sched = json.loads(meta["t2i"]), json.loads(meta["scheduler_config"])
    assert info["prediction"] == "v" and info["schedule"]["zero_terminal_snr"] and info["latent_scale"] == LATENT_SCALE
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"


def test_cli_single_file_from_a_run_dir(tiny_ldm_export, tmp_path, capsys):
    from t2i.cli.export import main

    main(["format=single_file", f"run_dir={Path(tiny_ldm_export).parent}", f"out={tmp_path / 'sd.safetensors'}"])
    assert "single-file checkpoint written" in capsys.readouterr().out
    keys = load_file(tmp_path / "sd.safetensors").keys()
    assert {k.split(".", 1)[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    with pytest.raises(SystemExit):
        main(["format=diffusers", f"export={tiny_ldm_export}", f"run_dir={Path(tiny_ldm_export).parent}"])
