"""Every experiment composes and instantiates; a misspelled key is an error, never ignored."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from t2i.cli.config import compose_config, config_dir
from t2i.exports import read_export

EXPERIMENTS = sorted(str(p.relative_to(config_dir() / "experiment").with_suffix(""))
                     for p in (config_dir() / "experiment").rglob("*.yaml"))


def test_experiments_are_found():
    assert {"tiny/vae", "tiny/ldm", "ldm/vae", "ldm/ldm"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path, tiny_vae_export, tiny_clip_export):
    """Every network of every experiment is built (real sizes on the meta device: no memory, no time);
    tiny experiments build their whole stage. Paths a user must supply (shards, a pretrained text tower
    file, a CLIP stage export) are the only missing values."""
    cfg = compose_config([f"experiment={experiment}", f"run_dir={tmp_path}",
                          "data.train_manifest=/nonexistent/train", "trainer.accelerator=cpu", "trainer.devices=1"])
    if "export" in list((cfg.model.get("target") or {}).keys()):
        cfg.model.target.export = str(tiny_vae_export)
    missing = sorted(_missing_keys(cfg))
    assert all(k.endswith(("checkpoint_path", "text_encoder.export_dir")) for k in missing), missing
    if experiment.startswith("tiny/") and "export_dir" in (cfg.model.get("text_encoder") or {}):
        cfg.model.text_encoder.export_dir = str(tiny_clip_export)  # the tiny CLIP, at the test's widths
        _fit_to_clip(cfg.model.denoiser, read_export(tiny_clip_export))
    for key, node in cfg.model.items():
        if OmegaConf.is_dict(node) and "_target_" in node and not any(m.startswith(f"model.{key}.") for m in missing):
            with torch.device("meta"):
                assert instantiate(node) is not None
    if experiment.startswith("tiny/"):
        model = instantiate(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0
    dm = instantiate(cfg.data)
    assert dm.batch_size == cfg.data.batch_size
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


def _fit_to_clip(denoiser, export) -> None:
    """Set a denoiser config's text widths to a CLIP export's: token width and pooled embedding width."""
    embed = int(export.metrics["embed_dim"])
    width = int(export.config["model"]["clip_config"]["text_cfg"]["width"])
    if "embed_dim" in denoiser:  # unCLIP prior / decoder
        denoiser.embed_dim, denoiser.text_width = embed, width
    elif "unet" in denoiser:  # a super-resolution UNet with text cross-attention
        denoiser.unet.context_dim = width
    else:  # a text-to-image UNet: tokens for cross-attention, the pooled embedding into the time embedding
        denoiser.context_dim, denoiser.vector_dim = width, embed


def _missing_keys(cfg, prefix=""):
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            yield path
        elif OmegaConf.is_dict(cfg[key]):
            yield from _missing_keys(cfg[key], path + ".")


def test_misspelled_override_fails():
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'trainer\.max_stepz'"):
        compose_config(["experiment=tiny/vae", "trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'model\.autoencoder\.latent_chanels'"):
        compose_config(["experiment=tiny/vae", "model.autoencoder.latent_chanels=8"])


def test_misspelled_key_in_a_config_fails_at_instantiation():
    cfg = compose_config(["experiment=tiny/vae"])
    OmegaConf.set_struct(cfg, False)
    cfg.model.autoencoder.latent_chanels = 8  # as if a yaml file had the typo
    with pytest.raises(Exception, match="latent_chanels"):
        instantiate(cfg.model)


def test_unknown_key_access_is_an_error():
    cfg = compose_config(["experiment=tiny/vae"])
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        _ = cfg.trainer.max_stepz


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.startswith("tiny/")])
def test_real_size_experiments_require_the_users_shards(experiment):
    """A forgotten data.train_manifest is an error, never a silent run on the built-in shapes data."""
    cfg = compose_config([f"experiment={experiment}"])
    assert OmegaConf.is_missing(cfg.data, "train_manifest"), cfg.data.train_manifest


def test_tiny_cpu_runs_use_bf16_only_where_the_cpu_has_it(monkeypatch):
    """trainer=cpu picks its precision for the machine: bf16 instructions (AVX512-BF16 or AMX) give bf16-mixed;
    AVX512 cores without them (oneDNN converts in software: 2.7x slower than fp32 for a tiny VAE step) and
    AVX2-only CPUs (50x slower) give 32-true."""
    import torch

    from t2i.cli import config as config_module

    for avx512_bf16, amx, onednn, want in ((True, False, True, "bf16-mixed"), (False, True, True, "bf16-mixed"),
                                           (False, False, True, "32-true"), (False, False, False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=onednn: v)
        assert config_module.cpu_precision() == want
        assert config_module.compose_config(["experiment=tiny/vae"]).trainer.precision == want
    # GPU and real-size configs keep bf16 whatever the CPU
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert config_module.compose_config(["experiment=ldm/ldm"]).trainer.precision == "bf16-mixed"
