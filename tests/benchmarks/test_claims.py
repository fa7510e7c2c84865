"""benchmarks/claims.py on the tiny test exports: every row of a claim is measured (accuracy from the oracle, domain
FID from the tiny CLIP export, wall time), and the page states the paper's claim, its figure and a verdict."""

from __future__ import annotations

import importlib.util
import json
import sys

from t2i_testing import REPO


def _claims():
    spec = importlib.util.spec_from_file_location("claims", REPO / "benchmarks" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["claims"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_claims_page_from_tiny_exports(tiny_ldm_export, tiny_clip_export, small_shapes, tmp_path, single_thread):
    out = tmp_path / "claims.md"
    _claims().main(["--ldm", str(tiny_ldm_export), "--clip", str(tiny_clip_export), "--val",
                    str(small_shapes / "val"), "--prompts", "3", "--batch-size", "3", "--only", "ddim_ddpm", "cfg",
                    "--out", str(out)])
    page = out.read_text()
    record = json.loads(out.with_suffix(".json").read_text())
    ddim, cfg = record["claims"]
    assert [(r[0], r[1]) for r in ddim["rows"]] == [(s, e) for s in (10, 25, 50, 100, 1000) for e in (0.0, 1.0)]
    assert [r[0] for r in cfg["rows"]] == [1.0, 1.5, 3.0, 5.0, 8.0]
    for claim in (ddim, cfg):
        assert claim["verdict"].startswith(("Agrees", "Does not agree"))
        assert all(float(r[-1]) > 0 for r in claim["rows"])  # wall time measured
    assert "Song et al. 2021, Table 1" in page and "Ho & Salimans 2022" in page and "**Measured:**" in page


def _module(name):
    _claims()  # puts benchmarks/ on sys.path
    return importlib.import_module(name)


def test_retrain_config_moves_every_path_and_applies_changes(tiny_ldm_export, tmp_path):
    training = _module("claims_training")
    cfg = training.retrain_config(tiny_ldm_export, tmp_path / "again", **{"model.latents_from": "pixels",
                                                                         "trainer.max_time": "00:00:00:03"})
    old_run = str(training.export_config(tiny_ldm_export)["run_dir"])
    assert old_run not in json.dumps(cfg), "a path still points into the export's own run folder"
    assert cfg["run_dir"] == str(tmp_path / "again") and cfg["export_dir"].startswith(str(tmp_path / "again"))
    assert cfg["callbacks"]["checkpoint"]["dirpath"].startswith(str(tmp_path / "again"))
    assert cfg["model"]["latents_from"] == "pixels" and cfg["trainer"]["max_time"] == "00:00:00:03"
    assert cfg["model"]["sample_prompts"] == [] and cfg["final_validation"] is False
    # the export's other settings are kept (the test fixture's narrow UNet, not the tiny/ldm default)
    assert cfg["model"]["denoiser"]["model_channels"] == 16


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
    assert pixel_export.config["model"]["latents_from"] == "pixels"
    assert pixel_export.config["model"]["denoiser"]["in_channels"] == 3
    assert claim["verdict"].startswith(("Agrees", "Does not agree")) and "Rombach et al. 2022" in out.read_text()
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
