"""A stage export may come from anywhere: the Hydra ``_target_``s of its config.yaml are restricted to an explicit
list of t2i classes and the optimizers they need (`t2i.allowed_targets`), checked before anything is imported or
called. Every malicious target here would create a file if it ran (``os.makedirs``, ``shutil.copyfile``,
``torch.save``, tensorboard's ``SummaryWriter``...: this Hydra version blocks ``os.system`` itself, but not those);
each test asserts the refusal (naming the export, the key path and the target) and that no file exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from t2i_testing import REPO

from t2i.allowed_targets import MODEL_TARGETS, RUN_TARGETS, allow
from t2i.conditioning.text import OpenClipTextEncoder
from t2i.exports import CONFIG, ExportError, check_export_targets, read_export
from t2i.pipelines.autoencoder import load_autoencoder
from t2i.pipelines.build import build_from_config, resolve_export_target
from t2i.pipelines.text_to_image import TextToImagePipeline


def tampered(export: Path, folder: Path, edit) -> Path:
    """A copy of `export` whose config.yaml `edit(config)` changed."""
    shutil.copytree(export, folder)
    config = yaml.safe_load((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def touch(marker: Path) -> dict:
    return {"_target_": "os.makedirs", "_args_": [str(marker)]}


def _unet(config: dict) -> dict:
    return config["model"]["denoiser"]


CASES = {
    # where the malicious node goes -> the key path the error must name
    "top-level target": (lambda c, m: c["model"].update(denoiser=touch(m)), "model.denoiser._target_"),
    "nested in a list": (lambda c, m: _unet(c).update(channel_mult=[1, touch(m), 2]),
                         "model.denoiser.channel_mult[1]._target_"),
    "_partial_ target": (lambda c, m: c["model"].update(lr_scheduler={**touch(m), "_partial_": True}),
                         "model.lr_scheduler._target_"),
    "in a module's arguments": (lambda c, m: c["model"]["cond_dropout"].update(p={"context": touch(m)}),
                                "model.cond_dropout.p.context._target_"),
    "interpolation creating a node": (lambda c, m: _unet(c).update(
        num_groups="${oc.create:{_target_: os.makedirs, _args_: ['" + str(m) + "']}}"),
        "model.denoiser.num_groups"),
    "os.system": (lambda c, m: c["model"].update(denoiser={"_target_": "os.system", "_args_": [f"touch {m}"]}),
                  "model.denoiser._target_"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malicious_target_is_refused_before_anything_runs(tiny_ldm_export, tmp_path, case):
    marker = tmp_path / "pwned"
    edit, key_path = CASES[case]
    evil = tampered(tiny_ldm_export, tmp_path / "evil", lambda c: edit(c, marker))
    before = (evil / CONFIG).read_bytes()
    with pytest.raises(ExportError) as err:
        TextToImagePipeline.from_export(evil)
    message = str(err.value)
    assert str(evil / CONFIG) in message and key_path in message, message
    assert ("os.system" if case == "os.system" else "os.makedirs") in message and "refusing" in message
    with pytest.raises(ExportError, match="refusing"):
        read_export(evil)  # every reader is covered, not only the pipelines
    assert not marker.exists(), "the export's target ran"
    assert (evil / CONFIG).read_bytes() == before


BYPASSES = {  # names under t2i. or torch. that would still create the marker if they ran
    "torch.os.makedirs": lambda m, cfg: {"_args_": [str(m)]},  # torch imports os
    "t2i.exports.shutil.copyfile": lambda m, cfg: {"_args_": [str(cfg), str(m)]},
    "torch.save": lambda m, cfg: {"obj": [1], "f": str(m)},  # torch.load could unpickle
    "t2i.exports.write_export": lambda m, cfg: {"folder": str(m), "stage": "x", "state_dict": {}, "config": {}},
    # a torch class whose constructor writes: a folder and an event file
    "torch.utils.tensorboard.SummaryWriter": lambda m, cfg: {"log_dir": str(m)},
    "torch.utils.tensorboard.writer.SummaryWriter": lambda m, cfg: {"log_dir": str(m)},
    "t2i.nn.no_such_module.Thing": lambda m, cfg: {},
}


@pytest.mark.parametrize("target", list(BYPASSES))
def test_targets_that_only_look_like_t2i_or_torch_are_refused(tiny_ldm_export, tmp_path, target):
    marker = tmp_path / "pwned"
    node = {"_target_": target, **BYPASSES[target](marker, tiny_ldm_export / CONFIG)}
    evil = tampered(tiny_ldm_export, tmp_path / "evil", lambda c: c["model"].update(text_encoder=node))
    for load in (read_export, TextToImagePipeline.from_export):
        with pytest.raises(ExportError, match="refusing") as err:
            load(evil)
        assert "model.text_encoder._target_" in str(err.value) and target in str(err.value)
    assert not marker.exists()


def test_a_summary_writer_in_a_vae_export_creates_nothing(tiny_vae_export, tmp_path):
    """The audit's case: an autoencoder node naming tensorboard's SummaryWriter with a log_dir."""
    marker = tmp_path / "pwned"
    evil = tampered(tiny_vae_export, tmp_path / "evil", lambda c: c["model"].update(autoencoder={
        "_target_": "torch.utils.tensorboard.SummaryWriter", "log_dir": str(marker)}))
    with pytest.raises(ExportError, match=r"model\.autoencoder\._target_='torch\.utils\.tensorboard"):
        load_autoencoder(evil)
    assert not marker.exists()


def test_every_target_the_configs_name_is_allowed_and_exists():
    """The list is complete (every ``_target_`` in configs/ is on it: a model section's on `MODEL_TARGETS`) and
    holds no stale name (each one imports, except DeepSpeed's CPU Adam where DeepSpeed's ops do not load)."""
    named = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text()
        for line in text.splitlines():
            if line.strip().startswith("_target_:"):
                named.setdefault(line.split(":", 1)[1].strip(), path)
    model_files = [p for p in (REPO / "configs" / "model").rglob("*.yaml")]
    model_named = {t for t, p in named.items() if p in model_files}
    assert model_named and model_named <= MODEL_TARGETS, sorted(model_named - MODEL_TARGETS)
    assert set(named) <= MODEL_TARGETS | RUN_TARGETS, sorted(set(named) - MODEL_TARGETS - RUN_TARGETS)
    for name in sorted(MODEL_TARGETS):
        if not name.startswith("deepspeed."):
            assert callable(resolve_export_target(name, "test")), name
    with pytest.raises(ExportError, match="not one of"):
        resolve_export_target("torch.optim.SGD", "test")
    allow("torch.optim.SGD")  # a user's own addition
    try:
        assert resolve_export_target("torch.optim.SGD", "test").__name__ == "SGD"
    finally:
        MODEL_TARGETS.discard("torch.optim.SGD")


def test_a_tampered_clip_export_is_refused_wherever_it_is_read(tiny_clip_export, tmp_path):
    marker = tmp_path / "pwned"
    evil = tampered(tiny_clip_export, tmp_path / "evil", lambda c: c["model"].update(extra=[touch(marker)]))
    with pytest.raises(ExportError, match=r"model\.extra\[0\]\._target_='os\.makedirs'"):
        OpenClipTextEncoder.from_clip_export(evil)  # what frozen text encoders and data_prep scripts use
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.${oc.env:X}", "torch.nn._private",
                                    " t2i.nn.unet.UNet", "t2i", 3, "torch.nn.Linear", "t2i.exports.read_export"])
def test_check_export_targets_refuses_without_importing(target):
    with pytest.raises(ExportError, match=r"export\.yaml: refusing to build a\[0\]\.b\._target_="):
        check_export_targets({"a": [{"b": {"_target_": target}}]}, "export.yaml")


def test_legitimate_exports_still_load(tiny_vae_export, tiny_ldm_export, tiny_clip_export):
    for export in (tiny_vae_export, tiny_ldm_export, tiny_clip_export):
        found = dict(check_export_targets(read_export(export).config["model"], export, "model"))
        assert found and set(found.values()) <= MODEL_TARGETS
    assert load_autoencoder(tiny_vae_export).latent_channels == 4
    pipe = TextToImagePipeline.from_export(tiny_ldm_export)
    assert "text_encoder" in pipe.net and pipe.first_stage is not None
    assert OpenClipTextEncoder.from_clip_export(tiny_clip_export).width == 32
    optimizer = read_export(tiny_ldm_export).config["model"]["optimizer"]  # a _partial_ torch class
    assert resolve_export_target(optimizer["_target_"], "test").__name__ == "AdamW"
    built = build_from_config(optimizer, "test", "model.optimizer")
    assert built.func.__name__ == "AdamW" and built.keywords["lr"] == optimizer["lr"]
