"""Stable Diffusion UNet interop: diffusers folders and CompVis single files <-> t2i's UNet, at tiny sizes with
random weights (every parameter, so that zero-initialised layers cannot make a comparison trivial)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from t2i.interop.sd_unet import (
    compvis_checkpoint_state_dict,
    compvis_unet_state_dict,
    diffusers_to_t2i_unet_state_dict,
    t2i_to_diffusers_unet_state_dict,
)
from t2i.interop.sd_unet_config import diffusers_config_from_unet_kwargs, unet_kwargs_from_diffusers_config
from t2i.interop.sd_unet_io import load_diffusers_unet, save_diffusers_unet
from t2i.nn.unet import UNet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel

TOL = 1e-5
BASE = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
        "cross_attention_dim": 32, "norm_num_groups": 8}
CONFIGS = {
    # SD 1.x: int attention_head_dim = 8 heads at every level, conv proj_in/out, no attention at the last level
    "sd1": dict(BASE, layers_per_block=2, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: per-level head counts with a constant head width (16), linear projections, upcast_attention
    "sd2": dict(BASE, layers_per_block=1, attention_head_dim=[2, 4], use_linear_projection=True,
                upcast_attention=True, transformer_layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # three levels, the last without attention, per-level res blocks, a projected class embedding (our
    # vector conditioning) and scale-shift (FiLM) resnets
    "three_levels": dict(BASE, block_out_channels=(32, 64, 64), layers_per_block=[1, 2, 1], attention_head_dim=4,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                         class_embed_type="projection", projection_class_embeddings_input_dim=12,
                         resnet_time_scale_shift="scale_shift"),
}
VECTOR_DIM = {"three_levels": 12}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: matrices ~ N(0, 1/fan_in), norm scales ~ N(1, 0.1), biases ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def inputs(name: str, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10.0, 731.0])
    context = torch.randn(2, 7, 32, generator=gen)
    vector = torch.randn(2, VECTOR_DIM[name], generator=gen) if name in VECTOR_DIM else None
    return x, t, context, vector


def diffusers_out(model, x, t, context, vector):
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=context, class_labels=vector).sample


def t2i_out(model, x, t, context, vector):
    with torch.no_grad():
        return model(x, t, context=context, vector=vector)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def diffusers_model(name: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**CONFIGS[name]), seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_folder_to_t2i_matches_diffusers(name, tmp_path):
    reference = diffusers_model(name)
    reference.save_pretrained(tmp_path / "unet")
    unet, kwargs = load_diffusers_unet(tmp_path / "unet")
    assert isinstance(unet, UNet) and not unet.training
    x, t, context, vector = inputs(name)
    expected = diffusers_out(reference, x, t, context, vector)
    assert expected.abs().mean() > 0.1  # not a trivially small output
    assert max_diff(t2i_out(unet, x, t, context, vector), expected) <= TOL
    assert kwargs["norm_eps"] == 1e-5
    if name == "sd1":
        assert kwargs["num_heads"] == 8 and kwargs["num_head_channels"] == -1 and kwargs["attention_levels"] == [0]
    if name == "sd2":
        assert kwargs["num_head_channels"] == 16 and kwargs["use_linear_projection"]
        assert kwargs["transformer_depth"] == 2
    if name == "three_levels":
        assert kwargs["num_res_blocks"] == [1, 2, 1] and kwargs["vector_dim"] == 12
        assert kwargs["use_scale_shift_norm"] and kwargs["channel_mult"] == [1, 2, 2]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_t2i_to_diffusers_folder_matches_t2i(name, tmp_path):
    kwargs = unet_kwargs_from_diffusers_config(CONFIGS[name])
    torch.manual_seed(3)
    ours = randomize(UNet(**kwargs), seed=3)
    folder = save_diffusers_unet(ours, kwargs, tmp_path / "unet", sample_size=16)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["_diffusers_version"]
    assert unet_kwargs_from_diffusers_config(config) == kwargs  # the config round trip is exact
    theirs = UNet2DConditionModel.from_pretrained(folder).eval()
    x, t, context, vector = inputs(name, seed=4)
    expected = t2i_out(ours, x, t, context, vector)
    assert expected.abs().mean() > 0.1
    assert max_diff(diffusers_out(theirs, x, t, context, vector), expected) <= TOL


def test_t2i_defaults_export_exactly(tmp_path):
    """A UNet in our tiny-LDM layout with our own defaults (GroupNorm eps 1e-6, attention at every level, constant
    head width) is written with norm_eps 1e-6 and reproduced by diffusers."""
    kwargs = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 2],
              "num_res_blocks": 1, "attention_levels": [0, 1, 2], "num_head_channels": 16, "context_dim": 32,
              "num_groups": 32, "gradient_checkpointing": False, "_target_": "t2i.nn.unet.UNet"}
    ours = randomize(UNet(**{k: v for k, v in kwargs.items() if k != "_target_"}), seed=10)
    folder = save_diffusers_unet(ours, kwargs, tmp_path / "unet")
    config = json.loads((folder / "config.json").read_text())
    assert config["norm_eps"] == 1e-6 and config["attention_head_dim"] == [2, 4, 4]
    theirs = UNet2DConditionModel.from_pretrained(folder).eval()
    x, t, context, vector = inputs("sd1", seed=11)
    assert max_diff(diffusers_out(theirs, x, t, context, vector), t2i_out(ours, x, t, context, vector)) <= TOL
    back, back_kwargs = load_diffusers_unet(folder)
    assert back_kwargs["num_head_channels"] == 16 and back_kwargs["norm_eps"] == 1e-6
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())


def test_bin_weights_are_read_with_weights_only(tmp_path):
    reference = diffusers_model("sd1", seed=5)
    reference.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    unet, _ = load_diffusers_unet(tmp_path / "unet")
    x, t, context, vector = inputs("sd1")
    assert max_diff(t2i_out(unet, x, t, context, vector), diffusers_out(reference, x, t, context, vector)) <= TOL

    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create `marker`: only weights_only=True refuses it unrun
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((tmp_path / "unet" / "config.json").read_text())
    torch.save(dict(reference.state_dict(), evil=Payload()), evil / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*diffusion_pytorch_model\.bin.*weights_only=True"):
        load_diffusers_unet(evil)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_key_map_agrees_with_diffusers_own_single_file_converter(name):
    """diffusers' convert_ldm_unet_checkpoint (CompVis names -> diffusers names) gives the same renaming."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    reference = diffusers_model(name, seed=6)
    kwargs = unet_kwargs_from_diffusers_config(CONFIGS[name])
    ours = diffusers_to_t2i_unet_state_dict(reference.state_dict(), kwargs)
    theirs = convert_ldm_unet_checkpoint(compvis_checkpoint_state_dict(ours), dict(reference.config))
    back = t2i_to_diffusers_unet_state_dict(ours, kwargs)
    assert sorted(theirs) == sorted(back) == sorted(reference.state_dict())
    assert all(theirs[k] is back[k] for k in back)


def test_compvis_prefix_round_trip():
    kwargs = unet_kwargs_from_diffusers_config(CONFIGS["sd1"])
    ours = randomize(UNet(**kwargs), seed=7).state_dict()
    checkpoint = compvis_checkpoint_state_dict(ours)
    assert all(k.startswith("model.diffusion_model.") for k in checkpoint)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in checkpoint.items()}
    full = {**checkpoint, **ema, "first_stage_model.decoder.conv_in.weight": torch.zeros(3),
            "cond_stage_model.transformer.x": torch.zeros(2), "model_ema.decay": torch.tensor(0.999)}
    unet_sd = compvis_unet_state_dict(full, kwargs)
    assert list(unet_sd) == list(ours) and all(unet_sd[k] is ours[k] for k in ours)
    ema_sd = compvis_unet_state_dict(full, kwargs, ema=True)
    assert all(torch.equal(ema_sd[k], ours[k] + 1) for k in ours)
    UNet(**kwargs).load_state_dict(unet_sd, strict=True)
    with pytest.raises(ValueError, match="model.diffusion_model"):
        compvis_unet_state_dict({"first_stage_model.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="input_blocks.1.0.in_layers.0.weight"):
        compvis_unet_state_dict({k: v for k, v in checkpoint.items() if "input_blocks.1.0.in_layers.0.weight" not in k},
                                kwargs)
    with pytest.raises(ValueError, match="EMA"):
        compvis_unet_state_dict(checkpoint, ema=True)


def test_projection_given_as_1x1_conv_or_linear_is_reshaped():
    kwargs = unet_kwargs_from_diffusers_config(CONFIGS["sd2"])  # linear projections
    sd = diffusers_model("sd2", seed=8).state_dict()
    key = "down_blocks.0.attentions.0.proj_in.weight"
    as_conv = {**sd, key: sd[key][:, :, None, None]}
    ours = diffusers_to_t2i_unet_state_dict(as_conv, kwargs)
    assert torch.equal(ours["input_blocks.1.1.proj_in.weight"], sd[key])


@pytest.fixture(scope="module")
def sd1_state():
    return diffusers_model("sd1", seed=9).state_dict(), unet_kwargs_from_diffusers_config(CONFIGS["sd1"])


def test_missing_key_is_named(sd1_state):
    sd, kwargs = sd1_state
    key = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError, match=r"1 missing keys \[" + key.replace(".", r"\.")):
        diffusers_to_t2i_unet_state_dict({k: v for k, v in sd.items() if k != key}, kwargs)
    ours = diffusers_to_t2i_unet_state_dict(sd, kwargs)
    with pytest.raises(ValueError, match=r"missing keys \[out\.2\.bias\]"):
        t2i_to_diffusers_unet_state_dict({k: v for k, v in ours.items() if k != "out.2.bias"}, kwargs)


def test_unexpected_key_is_named(sd1_state):
    sd, kwargs = sd1_state
    extra = {"add_embedding.linear_1.weight": torch.zeros(4, 4), "down_blocks.1.attentions.0.norm.weight":
             torch.zeros(64)}  # the second: attention where the config has none
    with pytest.raises(ValueError, match="2 unexpected keys") as err:
        diffusers_to_t2i_unet_state_dict({**sd, **extra}, kwargs)
    assert all(k in str(err.value) for k in extra)


def test_wrong_shape_is_named(sd1_state):
    sd, kwargs = sd1_state
    key = "mid_block.resnets.1.conv1.weight"
    with pytest.raises(ValueError, match=r"shape mismatches \[mid_block\.resnets\.1\.conv1\.weight: "
                                         r"\(64, 64, 1, 1\), expected \(64, 64, 3, 3\)"):
        diffusers_to_t2i_unet_state_dict({**sd, key: torch.zeros(64, 64, 1, 1)}, kwargs)
    # a UNet configured differently (wider context) than the weights
    with pytest.raises(ValueError, match="attn2.to_k.weight"):
        diffusers_to_t2i_unet_state_dict(sd, {**kwargs, "context_dim": 48})


@pytest.mark.parametrize("option, value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("num_class_embeds", 10),
    ("resnet_time_scale_shift", "spatial"), ("dual_cross_attention", True), ("only_cross_attention", True),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("norm_num_groups", None), ("time_cond_proj_dim", 8),
    ("conv_in_kernel", 1), ("encoder_hid_dim", 16), ("flip_sin_to_cos", False), ("freq_shift", 1),
    ("transformer_layers_per_block", [[1, 2], [1]]), ("cross_attention_dim", [32, 48]),
    ("attention_head_dim", [2, 3]), ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("layers_per_block", [2, [1]]), ("block_out_channels", [32, 48]), ("brand_new_option", 1),
])
def test_unsupported_diffusers_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        unet_kwargs_from_diffusers_config({**CONFIGS["sd1"], option: value})


def test_several_unsupported_options_are_listed_together():
    config = {**CONFIGS["sd1"], "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
              "center_input_sample": True}
    with pytest.raises(ValueError) as err:
        unet_kwargs_from_diffusers_config(config)
    assert all(k in str(err.value) for k in ("addition_embed_type", "addition_time_embed_dim", "center_input_sample"))


@pytest.mark.parametrize("option, value", [
    ("efficient", True), ("resblock_updown", True), ("middle_attention", False), ("coordinate_channels", True),
    ("self_attention", False), ("concat_channels", 3), ("context_dim", None), ("num_groups", 12),
    ("no_such_option", 1),
])
def test_unsupported_t2i_options_are_refused_on_export(option, value):
    kwargs = {**unet_kwargs_from_diffusers_config(CONFIGS["sd1"]), option: value}
    with pytest.raises(ValueError, match=option):
        diffusers_config_from_unet_kwargs(kwargs)
    with pytest.raises(ValueError, match=option):
        t2i_to_diffusers_unet_state_dict({}, kwargs)


def test_load_refuses_other_classes_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["sd1"], "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_diffusers_unet(tmp_path)


_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
# the unet/config.json of Stable Diffusion 1.5 and 2.1 (768-v), as published
SD15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": _SD_DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": _SD_UP}
SD21 = {**SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
        "only_cross_attention": False, "sample_size": 96, "upcast_attention": True, "use_linear_projection": True}


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_real_stable_diffusion_configs_map_key_by_key(config):
    """Full-size SD 1.5 / 2.1 on the meta device (no memory): every key and shape maps, and the renaming is the
    one diffusers' own single-file converter does."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    kwargs = unet_kwargs_from_diffusers_config(config)
    common = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "channel_mult": [1, 2, 4, 4],
              "num_res_blocks": 2, "attention_levels": [0, 1, 2], "transformer_depth": 1, "num_groups": 32,
              "norm_eps": 1e-5}
    assert kwargs.items() >= common.items()
    if config is SD15:
        assert (kwargs["num_heads"], kwargs["num_head_channels"], kwargs["context_dim"]) == (8, -1, 768)
        assert not kwargs["use_linear_projection"]
    else:
        assert (kwargs["num_head_channels"], kwargs["context_dim"], kwargs["use_linear_projection"]) == (64, 1024, True)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = UNet(**kwargs)
    sd = reference.state_dict()
    converted = diffusers_to_t2i_unet_state_dict(sd, kwargs)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    theirs = convert_ldm_unet_checkpoint(compvis_checkpoint_state_dict(converted), config)
    assert sorted(theirs) == sorted(sd) and all(theirs[k] is sd[k] for k in sd)
    exported = diffusers_config_from_unet_kwargs(kwargs, sample_size=config["sample_size"])
    assert {k: exported[k] for k in config if not k.startswith("_") and k != "upcast_attention"} == \
        {k: v for k, v in config.items() if not k.startswith("_") and k != "upcast_attention"}


def test_sdxl_config_is_refused_by_name():
    sdxl = {**SD21, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
            "down_block_types": ["DownBlock2D"] + _SD_DOWN[:2], "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]}
    with pytest.raises(ValueError, match="addition_embed_type='text_time'") as err:
        unet_kwargs_from_diffusers_config(sdxl)
    assert "addition_time_embed_dim=256" in str(err.value) and "block_types" not in str(err.value)


def test_size_crop_conditioning_is_diffusers_text_time_layout():
    """SDXL's micro-conditioning: our vector [pooled, size_crop_embedding(ids)] through ``label_emb`` is diffusers'
    ``addition_embed_type="text_time"`` (``add_time_proj`` of the ids, concatenated after ``text_embeds``, through
    ``add_embedding``) with the same weights."""
    from t2i.conditioning.size_crop import size_crop_embedding, size_crop_ids

    dim, pooled = 8, 12
    config = dict(CONFIGS["three_levels"], class_embed_type=None, addition_embed_type="text_time",
                  addition_time_embed_dim=dim, projection_class_embeddings_input_dim=pooled + 6 * dim)
    reference = diffusers_model_from(config)
    as_projection = dict(config, class_embed_type="projection", addition_embed_type=None, addition_time_embed_dim=None)
    kwargs = unet_kwargs_from_diffusers_config(as_projection)
    state = {k.replace("add_embedding.", "class_embedding.", 1): v for k, v in reference.state_dict().items()}
    unet = UNet(**kwargs)
    unet.load_state_dict(diffusers_to_t2i_unet_state_dict(state, kwargs))
    x, t, context, _ = inputs("sd1")
    text_embeds = torch.randn(2, pooled, generator=torch.Generator().manual_seed(3))
    ids = size_crop_ids(2, (512, 768), torch.tensor([[600.0, 1000.0], [512.0, 768.0]]),
                        torch.tensor([[44.0, 116.0], [0.0, 0.0]]))
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": ids}).sample
    ours = t2i_out(unet.eval(), x, t, context, torch.cat([text_embeds, size_crop_embedding(ids, dim)], dim=1))
    assert expected.abs().mean() > 0.1 and max_diff(ours, expected) <= TOL
    other = t2i_out(unet, x, t, context, torch.cat([text_embeds, size_crop_embedding(ids.flip(0), dim)], dim=1))
    assert max_diff(other, ours) > 1e-3  # the ids reach the output


def diffusers_model_from(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**config), seed)
