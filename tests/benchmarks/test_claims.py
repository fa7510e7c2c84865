"""benchmarks/claims.py on the tiny test exports: every row of a claim is measured (accuracy from the oracle, domain
FID from the tiny CLIP export, wall time), and the page states the paper's claim, its figure and a verdict."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys

import numpy as np
import pytest
import yaml
from t2i_testing import (
    REPO,
    base_overrides,
    classifier_overrides,
    decoder_overrides,
    prior_overrides,
    sr_overrides,
)

from t2i.allowed_targets import TargetError
from t2i.eval.intervals import Z95


def _claims():
    spec = importlib.util.spec_from_file_location("claims", REPO / "benchmarks" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["claims"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_claims_page_from_tiny_exports(tiny_ldm_export, tiny_clip_export, small_shapes, tmp_path, single_thread):
    out = tmp_path / "claims.md"
    _claims().main(["--ldm", str(tiny_ldm_export), "--clip", str(tiny_clip_export), "--val",
                    str(small_shapes / "val"), "--train", str(small_shapes / "train"), "--prompts", "3",
                    "--batch-size", "3", "--only", "ddim_ddpm", "cfg", "--out", str(out)])
    page = out.read_text()
    record = json.loads(out.with_suffix(".json").read_text())
    ddim, cfg = record["claims"]
    assert [(r[0], r[1]) for r in ddim["rows"]] == [(s, e) for s in (2, 3, 5, 10, 20, 50, 1000) for e in (0.0, 1.0)]
    assert [(r[0], r[1]) for r in cfg["rows"]] == [(sp, s) for sp in ("seen", "unseen") for s in (1, 1.5, 3, 5, 8)]
    for claim in (ddim, cfg):
        assert claim["verdict"].startswith(VERDICTS) and claim["rule"]
        assert all(m["seconds"] > 0 for m in claim["data"].values())  # wall time measured
        for m in claim["data"].values():  # every figure carries its 95% interval
            assert m["n"] == 3 and m["ci"]["all"][0] <= m["all"] <= m["ci"]["all"][1]
            assert m["ci"]["fid"][0] <= m["ci"]["fid"][1]
    assert page.count("**Rule:**") == 2 and "% [" in page
    assert "Song et al. 2021, Table 1" in page and "Ho & Salimans 2022" in page and "**Measured:**" in page
    assert all(set(claim["baseline"]) == {"32"} for claim in (ddim, cfg))  # the real-data floor at the LDM's size
    assert page.count("Real-data floor: 3 real training images") == 2


VERDICTS = ("Agrees:", "Does not agree:", "Inconclusive:")


def test_three_way_verdicts_follow_the_intervals():
    claims = _claims()
    a = {"all": 0.9, "fid": 0.1, "ci": {"all": [0.85, 0.94], "fid": [0.08, 0.12]}}
    b = {"all": 0.7, "fid": 0.2, "ci": {"all": [0.62, 0.77], "fid": [0.11, 0.25]}}
    assert claims.better(a, b, "all") == 1 and claims.better(b, a, "all") == -1
    assert claims.better(a, b, "fid", lower_is_better=True) == 0  # the FID intervals overlap
    assert claims.three_way([1, 1]) == "Agrees" and claims.three_way([1, 0]) == "Inconclusive"
    assert claims.three_way([1, -1]) == "Does not agree" and claims.three_way([]) == "Inconclusive"
    assert claims.three_way([1, 0], any_suffices=True) == "Agrees"
    assert claims.cell(a, "all") == "90.0% [85.0, 94.0]" and claims.cell(a, "fid") == "0.1000 [0.0800, 0.1200]"


def test_bootstrap_interval_of_a_mean_covers_its_sampling_spread():
    bootstrap = _claims().bootstrap
    rng = np.random.default_rng(0)
    sample = rng.normal(3.0, 2.0, size=400)
    low, high = bootstrap(sample, np.mean, resamples=400, seed=1)
    half = Z95 * 2.0 / math.sqrt(400)  # the mean's 95% half-width
    assert low < sample.mean() < high and abs((high - low) / 2 - half) < 0.25 * half
    assert bootstrap(sample, np.mean, resamples=400, seed=1) == (low, high)
    with pytest.raises(ValueError):
        bootstrap(sample[:1], np.mean)


def test_overlap():
    overlap = _claims().overlap
    assert overlap((0.1, 0.3), (0.3, 0.5)) and overlap((0.2, 0.4), (0.1, 0.5))
    assert not overlap((0.1, 0.2), (0.3, 0.4)) and not overlap((0.3, 0.4), (0.1, 0.2))


def test_retrain_config_moves_every_path_and_applies_changes(tiny_ldm_export, tmp_path):
    claims = _claims()
    cfg = claims.retrain_config(tiny_ldm_export, tmp_path / "again", **{"model.target": {"_target_": "t2i.stages.targets.Pixels"},
                                                                       "trainer.max_time": "00:00:00:03"})
    old_run = str(claims.export_config(tiny_ldm_export)["run_dir"])
    assert old_run not in json.dumps(cfg), "a path still points into the export's own run folder"
    assert cfg["run_dir"] == str(tmp_path / "again") and cfg["export_dir"].startswith(str(tmp_path / "again"))
    assert cfg["callbacks"]["checkpoint"]["dirpath"].startswith(str(tmp_path / "again"))
    assert cfg["model"]["target"] == {"_target_": "t2i.stages.targets.Pixels"} and cfg["trainer"]["max_time"] == "00:00:00:03"
    assert cfg["model"]["sample_prompts"] == [] and cfg["final_validation"] is False
    # the export's other settings are kept (the test fixture's narrow UNet, not the tiny/ldm default)
    assert cfg["model"]["denoiser"]["model_channels"] == 16


def test_retraining_checks_every_target_of_the_export_config(tiny_ldm_export, tmp_path):
    """The claims retrain an export's whole config (trainer, callbacks, data, model): each ``_target_`` is checked
    against t2i.allowed_targets first, so a tampered one runs nothing."""
    claims = _claims()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(tiny_ldm_export, evil)
    config = yaml.safe_load((evil / "config.yaml").read_text())
    config["callbacks"]["writer"] = {"_target_": "torch.utils.tensorboard.SummaryWriter", "log_dir": str(marker)}
    (evil / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(TargetError, match=r"callbacks\.writer\._target_='torch\.utils\.tensorboard"):
        claims.retrain_config(evil, tmp_path / "again")
    assert not marker.exists()


def test_latent_pixel_trains_both_for_the_same_wall_time(tiny_ldm_export, tiny_clip_export, small_shapes, tmp_path,
                                                         single_thread):
    out = tmp_path / "claims.md"
    _claims().main(["--ldm", str(tiny_ldm_export), "--clip", str(tiny_clip_export), "--val",
                    str(small_shapes / "val"), "--train", str(small_shapes / "train"), "--work", str(tmp_path / "w"),
                    "--minutes", "0.05", "--prompts", "3", "--batch-size", "3", "--only", "latent_pixel",
                    "--out", str(out)])
    (claim,) = json.loads(out.with_suffix(".json").read_text())["claims"]
    latent, pixel = claim["rows"]
    assert latent[0] == "latent" and pixel[0] == "pixel" and pixel[1] == "3x32²"
    assert latent[2] >= 1 and pixel[2] >= 1  # optimizer steps taken inside the budget
    for name in ("latent", "pixel"):
        assert claim["data"][name]["seconds"] < 60, "the wall-time budget was not applied"
    from t2i.exports import read_export
    pixel_export = read_export(tmp_path / "w" / "pixel" / "export")
    assert pixel_export.config["model"]["target"]["_target_"] == "t2i.stages.targets.Pixels"
    assert pixel_export.config["model"]["denoiser"]["in_channels"] == 3
    assert claim["verdict"].startswith(VERDICTS) and "Rombach et al. 2022" in out.read_text()
    assert (tmp_path / "images" / "claims_latent_pixel.png").stat().st_size > 1000


def test_replot_redraws_the_page_from_the_json(tmp_path):
    """A GPU run without matplotlib writes --no-plots; --replot draws the figures later from the JSON alone."""
    claims = _claims()
    data = {f"{s} {e:g}": {"all": 0.5 + s / 4000, "fid": 1.0 / s, "shape": 0.9} for s in (10, 1000) for e in (0.0, 1.0)}
    record = {"prompts": 4, "claims": [{"key": "ddim_ddpm", "title": "DDIM vs DDPM", "paper": "p", "figure": "f",
                                        "columns": ["steps"], "rows": [[10]], "verdict": "Agrees: x", "data": data,
                                        "seconds": 1.0, "machine": "m", "date": "d"}]}
    out = tmp_path / "claims.md"
    out.with_suffix(".json").write_text(json.dumps(record))
    claims.main(["--replot", "--out", str(out)])
    assert (tmp_path / "images" / "claims_ddim_ddpm.png").stat().st_size > 1000
    assert "![DDIM vs DDPM](images/claims_ddim_ddpm.png)" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["claims"][0]["plot"] == "images/claims_ddim_ddpm.png"


@pytest.fixture(scope="module")
def cascade_and_unclip(small_shapes, clip_shards, tiny_clip_export, tmp_path_factory):
    """One-step exports of every stage the other four claims read: the GLIDE base and SR stages (a pixel base
    with its own text encoder, and a text-conditioned 16->64 SR with noise augmentation), the noisy classifier
    (same schedule as the base), and the unCLIP prior and decoder."""
    from t2i.cli.config import compose_config
    from t2i.cli.train import train
    root = tmp_path_factory.mktemp("claims_exports")
    one = ("trainer.fast_dev_run=true",)

    def run(overrides):
        return str(train(compose_config(overrides)).export_dir)

    return {"base": run(base_overrides("glide", root / "base", small_shapes, tiny_clip_export, *one)),
            "imagen_base": run(base_overrides("imagen", root / "imagen_base", small_shapes, tiny_clip_export, *one)),
            "sr": run(sr_overrides("glide", root / "sr", small_shapes, tiny_clip_export, *one)),
            "classifier": run(classifier_overrides(small_shapes, root / "classifier", *one)),
            "prior": run(prior_overrides(root / "prior", clip_shards, tiny_clip_export, *one)),
            "decoder": run(decoder_overrides(root / "decoder", clip_shards, tiny_clip_export, *one))}


def test_cascade_unclip_and_guidance_claims_run_on_tiny_exports(cascade_and_unclip, tiny_clip_export, small_shapes,
                                                                 tmp_path, single_thread):
    e = cascade_and_unclip
    out = tmp_path / "claims.md"
    _claims().main(["--base", e["imagen_base"], "--glide-base", e["base"], "--sr", e["sr"], "--classifier",
                    e["classifier"], "--prior", e["prior"], "--decoder", e["decoder"], "--clip", str(tiny_clip_export),
                    "--val", str(small_shapes / "val"), "--train", str(small_shapes / "train"), "--work",
                    str(tmp_path / "w"), "--prompts", "2", "--batch-size", "2", "--only", "classifier_vs_cfg",
                    "thresholding", "noise_augmentation", "unclip_prior", "frozen_vs_joint", "--out", str(out)])
    from t2i.exports import read_export
    record = {c["key"]: c for c in json.loads(out.with_suffix(".json").read_text())["claims"]}
    assert list(record) == ["thresholding", "noise_augmentation", "unclip_prior", "classifier_vs_cfg",
                            "frozen_vs_joint"]  # page order
    assert [(r[0], r[1]) for r in record["thresholding"]["rows"][:-1]] == [
        (s, m) for s in (1.0, 5.0, 8.0) for m in ("none", "static", "dynamic")]
    noise = record["noise_augmentation"]
    # on an early and the recipe's base: the recipe's SR at levels 0 and its trained level, the retrained one
    # (augmentation off) at 0 only; then each on real low-res images
    settings = [("augmentation on (recipe)", "0"), ("augmentation on (recipe)", "0.1"), ("augmentation off", "0")]
    bases = ("early (120 steps)", "recipe (1200 steps)", "real low-res validation images")
    assert [tuple(r[:3]) for r in noise["rows"]] == [(b, *x) for b in bases for x in settings]
    early = read_export(tmp_path / "w" / "base_early" / "export")
    assert early.config["trainer"]["max_steps"] == 120
    off = read_export(tmp_path / "w" / "sr_no_augmentation" / "export").config["model"]["degradation"]
    assert off["noise_prob"] == 0.0 and off["sample_noise_level"] == 0.0
    assert [(r[0], r[1]) for r in record["unclip_prior"]["rows"]] == [(split, name) for split in ("seen", "unseen") for name in (
        "caption only", "caption + CLIP text embedding", "caption + prior's image embedding (unCLIP)",
        "caption + true image embedding (upper bound)")]
    assert [(r[0], r[1]) for r in record["frozen_vs_joint"]["rows"]] == [
        (split, name) for name in ("frozen CLIP text tower (Imagen)", "trained jointly (GLIDE)")
        for split in ("seen", "unseen")]
    assert [(r[0], r[1]) for r in record["classifier_vs_cfg"]["rows"]] == [
        ("none (unconditional model)", 0.0), ("classifier", 3.0), ("classifier", 10.0), ("classifier", 30.0),
        ("classifier-free", 1.0), ("classifier-free", 3.0), ("classifier-free", 5.0)]
    for claim in record.values():
        assert claim["verdict"].startswith(VERDICTS) and claim["seconds"] > 0 and claim["rule"]
        assert (tmp_path / claim["plot"]).stat().st_size > 1000
    page = out.read_text()
    assert "Ramesh et al. 2022" in page and "Dhariwal & Nichol 2021" in page and "Cascaded Diffusion Models" in page
    assert "Saharia et al. 2022 (Imagen), Sections 2.1 and 4.4" in page
