"""`t2i.cli.import_weights` and ``model.denoiser_init``: Stable Diffusion weights from local files (a single-file
CompVis checkpoint, a diffusers folder) into t2i's stages, built here at tiny size with random weights: the
imported UNet, VAE and text tower compute what the originals compute; a checkpoint of another architecture, a
damaged file and a ``.ckpt`` holding pickled objects are refused with clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from t2i_testing import tiny_ldm_overrides

from t2i.cli.config import compose_config
from t2i.cli.import_weights import import_stable_diffusion, main, preset_unet_kwargs
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.interop import sd_unet_config
from t2i.interop.single_file import hf_clip_text_to_open_clip
from t2i.nn.autoencoder import AutoencoderKL
from t2i.nn.unet import UNet
from t2i.pipelines.autoencoder import load_autoencoder

PRESET = "tiny/ldm"  # the tiny LDM's UNet stands in for an SD preset (same code path, seconds instead of minutes)
VAE_KWARGS = {"in_channels": 3, "out_channels": 3, "base_channels": 32, "channel_mult": [1, 2],
              "num_res_blocks": 1, "latent_channels": 4, "attn_in_mid": True, "dropout": 0.0, "num_groups": 32}  # SD: 32 groups


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():  # zero-initialised output layers would make comparisons trivial
        p.data = torch.randn(p.shape, generator=g) * 0.05
    return module.eval()


@pytest.fixture(scope="module")
def sd_parts():
    unet = _randomize(UNet(**preset_unet_kwargs(PRESET)), 0)
    vae = _randomize(AutoencoderKL(**VAE_KWARGS), 1)
    text = _randomize(OpenClipTextEncoder.from_config(width=32, layers=2, heads=2, context_length=16,
                                                      output_dim=32).tower, 2)
    return unet, vae, text


@pytest.fixture(scope="module")
def sd2_file(sd_parts, tmp_path_factory):
    """A single-file SD 2-style checkpoint: CompVis prefixes, the text tower in open_clip names."""
    unet, vae, text = sd_parts
    sd = {**{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
          **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
          **{f"cond_stage_model.model.{k}": v for k, v in text.state_dict().items() if k != "attn_mask"}}
    path = tmp_path_factory.mktemp("sd") / "sd2-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _x(seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 128, generator=g))


def test_single_file_import_reproduces_every_part(sd_parts, sd2_file, tmp_path):
    unet, vae, text = sd_parts
    record = import_stable_diffusion(sd2_file, tmp_path / "import", preset=PRESET)
    assert set(record["written"]) == {"unet", "vae", "text"}
    assert json.loads((tmp_path / "import" / "import.json").read_text())["preset"] == PRESET
    imported = UNet(**preset_unet_kwargs(PRESET)).eval()
    imported.load_state_dict(load_file(record["written"]["unet"]), strict=True)
    x, t, ctx = _x()
    with torch.no_grad():
        assert torch.equal(imported(x, t, context=ctx), unet(x, t, context=ctx))
    frozen = load_autoencoder(record["written"]["vae"])
    assert frozen.latent_scale == pytest.approx(0.18215)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(frozen.encode(image), vae.encode(image).mode() * 0.18215)
    tower = load_file(record["written"]["text"])
    assert all(torch.equal(tower[k], v) for k, v in text.state_dict().items() if k != "attn_mask")


def test_denoiser_init_starts_the_stage_and_its_ema_from_the_imported_weights(sd_parts, sd2_file, small_shapes,
                                                                              tiny_vae_export, tmp_path):
    unet, _, _ = sd_parts
    record = import_stable_diffusion(sd2_file, tmp_path / "import", preset=PRESET, what="unet")
    cfg = compose_config(tiny_ldm_overrides(small_shapes, tiny_vae_export, tmp_path / "run",
                                            f"model.denoiser_init={record['written']['unet']}",
                                            "model.denoiser.model_channels=64", "model.denoiser.num_head_channels=32",
                                            "model.denoiser.num_groups=32", "model.text_encoder.width=128",
                                            "model.text_encoder.output_dim=128"))
    stage = instantiate(cfg.model)
    for name, ref in unet.state_dict().items():
        assert torch.equal(stage.net["denoiser"].state_dict()[name], ref), name
        assert torch.equal(stage.ema.module["denoiser"].state_dict()[name], ref), name


def test_diffusers_folder_import(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
              "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
              "attention_head_dim": 4, "norm_num_groups": 8}
    theirs = _randomize(diffusers.UNet2DConditionModel(**config), 4)
    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    vae = _randomize(diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                                             norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2), 5)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    record = import_stable_diffusion(tmp_path / "pipe", tmp_path / "import")
    kwargs = sd_unet_config.unet_kwargs_from_diffusers_config(dict(theirs.config))
    ours = UNet(**kwargs).eval()
    ours.load_state_dict(load_file(record["written"]["unet"]), strict=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context=ctx), theirs(x, t, encoder_hidden_states=ctx).sample,
                                   rtol=0, atol=1e-5)
    assert load_autoencoder(record["written"]["vae"]).latent_channels == 4
    assert "text" not in record["written"]  # no text_encoder/ in this folder


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(sd_parts, sd2_file, tmp_path):
    given = sd_parts[0].state_dict()  # the file's UNet: the tiny preset's
    with torch.device("meta"):  # SD 1's UNet for its names and shapes, without its memory
        wanted = UNet(**preset_unet_kwargs("sd/v1")).state_dict()
    missing = [k for k in wanted if k not in given]
    unexpected = sorted(k for k in given if k not in wanted)
    mismatched = [k for k in wanted if k in given and given[k].shape != wanted[k].shape]
    conv_in = "input_blocks.0.0.weight"  # present in both, 64 channels against SD's 320
    assert missing and unexpected and conv_in in mismatched  # the three kinds of difference the error must name
    with pytest.raises(ValueError) as refused:
        import_stable_diffusion(sd2_file, tmp_path / "import", preset="sd/v1")  # an SD-sized preset
    message = str(refused.value)
    assert message.startswith("CompVis checkpoint -> t2i UNet: the state dict does not match the UNet configuration")
    assert f"{len(missing)} missing keys [{missing[0]}, {missing[1]}, " in message
    assert f"{len(unexpected)} unexpected keys [{unexpected[0]}, {unexpected[1]}, " in message
    assert f"{len(mismatched)} shape mismatches [{mismatched[0]}: {tuple(given[mismatched[0]].shape)}, " in message
    assert f"{conv_in}: {tuple(given[conv_in].shape)}, expected {tuple(wanted[conv_in].shape)}" in message
    assert not (tmp_path / "import" / "unet.safetensors").exists()


def test_damaged_and_pickled_files_are_refused(sd2_file, tmp_path):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(sd2_file.read_bytes()[: sd2_file.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint|truncated"):
        import_stable_diffusion(truncated, tmp_path / "a")
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": Payload()}}, f)
    with pytest.raises(ValueError, match="weights_only"):
        import_stable_diffusion(evil, tmp_path / "b")
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        other = tmp_path / "other.safetensors"
        save_file({"foo.weight": torch.zeros(2)}, other)
        import_stable_diffusion(other, tmp_path / "c")


def test_hf_clip_text_names_map_onto_open_clip_strictly(sd_parts):
    _, _, text = sd_parts
    sd = text.state_dict()
    hf = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
          "text_model.embeddings.position_ids": torch.arange(16)[None],
          "text_model.final_layer_norm.weight": sd["ln_final.weight"],
          "text_model.final_layer_norm.bias": sd["ln_final.bias"]}
    for i in range(2):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)
            hf.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                       f"{dst}self_attn.v_proj.{kind}": v,
                       f"{dst}self_attn.out_proj.{kind}": sd[f"{src}attn.out_proj.{kind}"],
                       f"{dst}layer_norm1.{kind}": sd[f"{src}ln_1.{kind}"],
                       f"{dst}layer_norm2.{kind}": sd[f"{src}ln_2.{kind}"],
                       f"{dst}mlp.fc1.{kind}": sd[f"{src}mlp.c_fc.{kind}"],
                       f"{dst}mlp.fc2.{kind}": sd[f"{src}mlp.c_proj.{kind}"]})
    hf["text_projection.weight"] = sd["text_projection"].t()
    back = hf_clip_text_to_open_clip(hf)
    assert set(back) == {k for k in sd if k != "attn_mask"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    with pytest.raises(ValueError, match="not mapped"):
        hf_clip_text_to_open_clip({**hf, "text_model.extra.weight": torch.zeros(1)})


def test_cli_and_presets(sd2_file, tmp_path, capsys):
    main([f"source={sd2_file}", f"out={tmp_path / 'cli'}", f"preset={PRESET}", "what=vae"])
    out = capsys.readouterr().out
    assert "model.target.export=" in out and (tmp_path / "cli" / "vae" / "stage.json").is_file()
    v1, v2 = preset_unet_kwargs("sd/v1"), preset_unet_kwargs("sd/v2")
    assert (v1["context_dim"], v1["use_linear_projection"], v1["num_heads"]) == (768, False, 8)
    assert (v2["context_dim"], v2["use_linear_projection"], v2["num_head_channels"]) == (1024, True, 64)
    assert v1["norm_eps"] == v2["norm_eps"] == 1e-5
    recipe = OmegaConf.load("recipes/ldm_finetune.yaml")
    ldm = next(s for s in recipe.steps if s.name == "ldm")
    cfg = compose_config([f"experiment={ldm.experiment}", *ldm.overrides])  # the recipe's keys exist
    assert cfg.model.denoiser_init.endswith("unet.safetensors")
