"""VAE weight interop: diffusers AutoencoderKL folders and CompVis single-file keys <-> t2i's AutoencoderKL.

Tiny configs built locally with every weight randomized; forwards must agree to <= 1e-5 in fp32."""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from t2i.interop.sd_vae import (
    SD_SCALING_FACTOR,
    autoencoder_kwargs_from_diffusers_config,
    check_t2i_vae_state_dict,
    diffusers_config_from_autoencoder_kwargs,
    diffusers_to_t2i_vae_state_dict,
    normalize_autoencoder_kwargs,
    scaling_factor_from_diffusers_config,
    t2i_to_diffusers_vae_state_dict,
)
from t2i.interop.sd_vae_compvis import (
    autoencoder_kwargs_from_compvis_config,
    autoencoder_kwargs_from_compvis_state_dict,
    compvis_vae_state_dict,
    prefix_compvis_vae_state_dict,
)
from t2i.interop.sd_vae_io import load_diffusers_vae, read_vae_export, save_diffusers_vae, write_vae_export
from t2i.nn.autoencoder import AutoencoderKL

TOL = 1e-5
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
        "sample_size": 16, "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 0.5}
# three levels (two down/upsamplers), two resnets per level, a shortcut conv in the middle level, no mid attention
DEEP = {"block_out_channels": [32, 64, 64], "layers_per_block": 2, "latent_channels": 8, "norm_num_groups": 8,
        "sample_size": 16, "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "mid_block_add_attention": False}
CONFIGS = {"tiny": TINY, "deep": DEEP}


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm gains and biases included), scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(noise / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.3 * noise)
    return module.eval()


def diffusers_vae(config: dict, seed: int = 0):
    return randomize(diffusers.AutoencoderKL(**config), seed)


def inputs(config: dict, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    side = 16 // 2 ** (len(config["block_out_channels"]) - 1)
    return (torch.randn(2, 3, 16, 16, generator=gen),
            torch.randn(2, config["latent_channels"], side, side, generator=gen))


@torch.no_grad()
def max_diffs(ours: AutoencoderKL, theirs, config: dict) -> dict[str, float]:
    x, z = inputs(config)
    post, dist = ours.encode(x), theirs.encode(x).latent_dist
    return {"mean": (post.mean - dist.mean).abs().max().item(),
            "logvar": (post.logvar - dist.logvar).abs().max().item(),
            "decode": (ours.decode(z) - theirs.decode(z).sample).abs().max().item()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_loads_into_ours_with_equal_outputs(tmp_path, name):
    config = CONFIGS[name]
    vae = diffusers_vae(config)
    vae.save_pretrained(tmp_path / "vae")
    model, kwargs, scale = load_diffusers_vae(tmp_path / "vae")
    assert scale == config.get("scaling_factor", SD_SCALING_FACTOR)
    assert kwargs["base_channels"] == 32 and kwargs["num_res_blocks"] == config["layers_per_block"]
    assert kwargs["attn_in_mid"] == config.get("mid_block_add_attention", True)
    diffs = max_diffs(model, vae, config)
    print(name, "diffusers -> t2i max abs diff", diffs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_saved_as_diffusers_loads_with_equal_outputs(tmp_path, name):
    kwargs = autoencoder_kwargs_from_diffusers_config(CONFIGS[name])
    model = randomize(AutoencoderKL(**kwargs), seed=3)
    save_diffusers_vae(model, kwargs, 0.25, tmp_path / "vae", sample_size=16)
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == 0.25
    vae, info = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", output_loading_info=True)
    assert not any(info.values()), info  # no missing/unexpected/mismatched keys
    assert vae.config.scaling_factor == 0.25
    diffs = max_diffs(model, vae.eval(), CONFIGS[name])
    print(name, "t2i -> diffusers max abs diff", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_state_dict_mapping_is_a_bijection_and_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for config in CONFIGS.values():
        vae = diffusers_vae(config)
        kwargs = autoencoder_kwargs_from_diffusers_config(config)
        theirs = vae.state_dict()
        ours = diffusers_to_t2i_vae_state_dict(theirs, kwargs)
        assert set(ours) == set(AutoencoderKL(**kwargs).state_dict())
        back = t2i_to_diffusers_vae_state_dict(ours, kwargs)
        assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
        # diffusers' own single-file converter maps our (= CompVis) names the same way
        official = convert_ldm_vae_checkpoint(prefix_compvis_vae_state_dict(ours), dict(config))
        assert set(official) == set(theirs) and all(torch.equal(official[k], theirs[k]) for k in theirs)


def test_config_round_trip():
    for config in CONFIGS.values():
        kwargs = autoencoder_kwargs_from_diffusers_config(config)
        back = diffusers_config_from_autoencoder_kwargs(kwargs, scaling_factor_from_diffusers_config(config),
                                                        sample_size=16)
        assert {k: back[k] for k in config} == config
        assert back["scaling_factor"] == config.get("scaling_factor", SD_SCALING_FACTOR)
        assert autoencoder_kwargs_from_diffusers_config(back) == kwargs
    # SD v1's VAE config: ch 128 x (1, 2, 4, 4), 2 res blocks, 4 latent channels
    sd_v1 = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
             "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
             "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    kwargs = autoencoder_kwargs_from_diffusers_config(sd_v1)
    assert normalize_autoencoder_kwargs(kwargs) == normalize_autoencoder_kwargs({})  # our defaults: SD's VAE
    assert scaling_factor_from_diffusers_config(sd_v1) == 0.18215
    compvis = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss",
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0}}}
    assert autoencoder_kwargs_from_compvis_config(compvis) == kwargs
    compvis["params"]["ddconfig"]["attn_resolutions"] = [32]
    with pytest.raises(ValueError, match="attn_resolutions"):
        autoencoder_kwargs_from_compvis_config(compvis)


def test_compvis_single_file_round_trip():
    kwargs = autoencoder_kwargs_from_diffusers_config(TINY)
    ours = randomize(AutoencoderKL(**kwargs), seed=5).state_dict()
    full = {**prefix_compvis_vae_state_dict(ours), "model.diffusion_model.conv.weight": torch.zeros(1),
            "cond_stage_model.x": torch.zeros(1), "first_stage_model.loss.logvar": torch.zeros(())}
    assert all(k.startswith("first_stage_model.") for k in prefix_compvis_vae_state_dict(ours))
    vae_sd = compvis_vae_state_dict(full)
    assert set(vae_sd) == set(ours) and all(torch.equal(vae_sd[k], ours[k]) for k in ours)
    check_t2i_vae_state_dict(vae_sd, kwargs)
    inferred = autoencoder_kwargs_from_compvis_state_dict(vae_sd, num_groups=8)
    assert normalize_autoencoder_kwargs(inferred) == normalize_autoencoder_kwargs(kwargs)
    # a file whose mid attention is stored as Linear (C, C) weights, and a bare VAE file (no prefix)
    linear = {k: v[:, :, 0, 0] if ".attn_1." in k and v.dim() == 4 else v for k, v in ours.items()}
    bare = compvis_vae_state_dict(linear, prefix="")
    assert all(torch.equal(bare[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="first_stage_model"):
        compvis_vae_state_dict({"model.diffusion_model.x": torch.zeros(1)})


def test_vae_export_loads_with_load_autoencoder_and_encodes_like_diffusers(tmp_path):
    from t2i.pipelines.autoencoder import load_autoencoder

    vae = diffusers_vae(TINY)
    vae.save_pretrained(tmp_path / "vae")
    model, kwargs, scale = load_diffusers_vae(tmp_path / "vae")
    write_vae_export(model, kwargs, scale, tmp_path / "export", source=str(tmp_path / "vae"))
    info = json.loads((tmp_path / "export" / "stage.json").read_text())
    assert info["stage"] == "autoencoder"
    assert info["metrics"] == {"latent_scale": 0.5, "latent_channels": 4, "downsample_factor": 2}
    frozen = load_autoencoder(tmp_path / "export")
    x, _ = inputs(TINY)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        assert (frozen.encode(x) - latents).abs().max().item() <= TOL
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
        assert (frozen.decode(latents) - images).abs().max().item() <= TOL
    again, kw, sc = read_vae_export(tmp_path / "export")
    assert sc == 0.5 and kw == normalize_autoencoder_kwargs(kwargs)
    # and back out to diffusers
    save_diffusers_vae(frozen, kw, sc, tmp_path / "out")
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.scaling_factor == 0.5
    assert max(max_diffs(again, reloaded, TINY).values()) <= TOL


def test_legacy_attention_names_in_a_bin_file(tmp_path):
    vae = diffusers_vae(TINY)
    legacy = {}
    for k, v in vae.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    model, _, _ = load_diffusers_vae(tmp_path)
    assert max(max_diffs(model, vae, TINY).values()) <= TOL
    kwargs = autoencoder_kwargs_from_diffusers_config(TINY)
    both = {**legacy, "encoder.mid_block.attentions.0.to_q.weight": legacy["encoder.mid_block.attentions.0.query.weight"]}
    with pytest.raises(ValueError, match="legacy"):
        diffusers_to_t2i_vae_state_dict(both, kwargs)


def test_missing_extra_and_misshaped_keys_are_all_named():
    kwargs = autoencoder_kwargs_from_diffusers_config(TINY)
    theirs = dict(diffusers_vae(TINY).state_dict())
    del theirs["decoder.up_blocks.0.upsamplers.0.conv.bias"]
    theirs["decoder.up_blocks.2.resnets.0.conv1.weight"] = torch.zeros(1)
    theirs["encoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(64, 64, 1, 1)  # conv shape, not Linear
    with pytest.raises(ValueError) as err:
        diffusers_to_t2i_vae_state_dict(theirs, kwargs)
    for key in ("decoder.up_blocks.0.upsamplers.0.conv.bias", "decoder.up_blocks.2.resnets.0.conv1.weight",
                "encoder.mid_block.attentions.0.to_q.weight"):
        assert key in str(err.value)
    ours = dict(AutoencoderKL(**kwargs).state_dict())
    del ours["quant_conv.bias"]
    ours["loss.logvar"] = torch.zeros(())
    ours["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(ValueError) as err:
        t2i_to_diffusers_vae_state_dict(ours, kwargs)
    for key in ("quant_conv.bias", "loss.logvar", "decoder.conv_out.weight"):
        assert key in str(err.value)
    # an otherwise fine state dict for another config: every difference named
    other = autoencoder_kwargs_from_diffusers_config(DEEP)
    with pytest.raises(ValueError, match=r"missing keys .*decoder.up.2.block.0.*unexpected keys .*attn_1"):
        check_t2i_vae_state_dict(AutoencoderKL(**kwargs).state_dict(), other)


def test_truncated_or_missing_weights_file(tmp_path):
    vae = diffusers_vae(TINY)
    vae.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_diffusers_vae(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_vae(tmp_path)


@pytest.mark.parametrize("change, named", [
    ({"use_quant_conv": False}, "use_quant_conv"),
    ({"use_post_quant_conv": False}, "use_post_quant_conv"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"block_out_channels": [32, 48]}, "block_out_channels"),
    ({"norm_num_groups": 64}, "norm_num_groups"),
    ({"some_new_option": 1}, "some_new_option"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
])
def test_unsupported_diffusers_options_are_refused(change, named):
    config = {**TINY, **change}
    with pytest.raises(ValueError, match=named):
        autoencoder_kwargs_from_diffusers_config(config)
    with pytest.raises(ValueError, match=named):
        scaling_factor_from_diffusers_config(config)


def test_unrepresentable_t2i_kwargs_are_refused():
    # 24 and 48 channels with num_groups 16: ours falls back to 12 / 16 groups, diffusers cannot say so
    with pytest.raises(ValueError, match="num_groups=16"):
        diffusers_config_from_autoencoder_kwargs({"base_channels": 24, "channel_mult": [1, 2], "num_groups": 16})
    with pytest.raises(ValueError, match="unknown"):
        diffusers_config_from_autoencoder_kwargs({"double_z": False})
    # shift_factor 0 / None is SD's no-shift and is accepted
    assert scaling_factor_from_diffusers_config({**TINY, "shift_factor": 0.0}) == 0.5
