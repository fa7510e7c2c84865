"""The recipe runner: stages in order with earlier exports fed forward, up-to-date stages skipped,
a changed stage retrained alone, stage-prefixed overrides, and clear errors."""

from __future__ import annotations

import sys

import pytest
import yaml
from t2i_testing import recipe_strategy_overrides, tiny_ldm_overrides, tiny_overrides

from t2i.cli.recipe import RecipeError, RecipeRunner


def _strip(overrides: list[str], *drop: str) -> list[str]:
    return [o for o in overrides if not o.startswith(drop)]


def write_recipe(tmp_path, shapes) -> str:
    vae = _strip(tiny_overrides(shapes, tmp_path / "vae", "trainer.max_steps=2", "final_validation=false"),
                 "experiment=")
    ldm = _strip(tiny_ldm_overrides(shapes, "X", tmp_path / "ldm", "trainer.max_steps=2", "final_validation=false"),
                 "experiment=", "model.first_stage_export=")
    recipe = {"steps": [
        {"name": "hello", "kind": "command", "run": ["python", "-c", "print('prepared')"]},
        {"name": "vae", "kind": "train", "experiment": "tiny/vae", "overrides": vae},
        {"name": "ldm", "kind": "train", "experiment": "tiny/ldm", "parents": ["vae"],
         "overrides": [*ldm, "model.first_stage_export=${stage:vae}"]},
        {"name": "report", "kind": "call", "function": "t2i.eval.ldm_report:evaluate_ldm",
         "args": {"export": "${stage:ldm}", "out_dir": "${stage:ldm.run_dir}/eval",
                  "val_manifest": str(shapes / "val"), "num_prompts": 4, "steps": 2}},
    ]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["default", "zero3_cpu"])
def test_recipe_runs_skips_and_retrains_only_what_changed(small_shapes, tmp_path, capfd, strategy, monkeypatch):
    path = write_recipe(tmp_path, small_shapes)
    overrides = recipe_strategy_overrides(strategy, monkeypatch)
    exports = RecipeRunner(path, overrides).run()
    assert (exports["ldm"]["export"] / "stage.json").is_file()
    assert (tmp_path / "ldm" / "eval" / "report.md").is_file()
    capfd.readouterr()
    RecipeRunner(path, overrides).run()
    out = capfd.readouterr().out
    assert out.count("matches its config") == 2
    RecipeRunner(path, [*overrides, "ldm.model.sampler.steps=4"]).run()
    out = capfd.readouterr().out
    assert "vae: export" in out and "ldm: config changed" in out


def test_stage_prefixed_overrides_go_to_their_stage(tmp_path, small_shapes):
    runner = RecipeRunner(write_recipe(tmp_path, small_shapes), ["vae.trainer.max_steps=7", "seed=3"])
    assert runner.stage_overrides["vae"] == ["trainer.max_steps=7"]
    assert runner.global_overrides == ["seed=3"]
    _, cfg = runner.stage_config(runner.steps[1])
    assert cfg["trainer"]["max_steps"] == 7 and cfg["seed"] == 3


def test_reference_to_a_later_stage_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"steps": [
        {"name": "a", "kind": "command", "run": ["echo", "${stage:b}"]},
        {"name": "b", "kind": "train", "experiment": "tiny/vae"}]}))
    with pytest.raises(RecipeError, match="has not run before"):
        RecipeRunner(str(path)).run()


def test_failing_command_stops_the_recipe(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"steps": [
        {"name": "boom", "kind": "command", "run": [sys.executable, "-c", "raise SystemExit(3)"]}]}))
    with pytest.raises(RecipeError, match="boom"):
        RecipeRunner(str(path)).run()


def test_stage_references_resolve_inside_list_and_dict_arguments(tmp_path):
    runner = RecipeRunner(write_recipe(tmp_path, tmp_path))
    runner.exports["vae"] = {"export": tmp_path / "vae" / "export", "hash": "abc", "run_dir": tmp_path / "vae"}
    value = runner._resolve_value({"list": ["${stage:vae}", 3], "nested": {"h": "${stage:vae.hash}"}, "n": 1})
    assert value == {"list": [str(tmp_path / "vae" / "export"), 3], "nested": {"h": "abc"}, "n": 1}


def test_only_a_command_step_runs_it_without_checking_later_stages(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "only.yaml"
    path.write_text(yaml.safe_dump({"steps": [
        {"name": "prep", "kind": "command", "run": [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"]},
        {"name": "untrained", "kind": "train", "experiment": "tiny/vae"}]}))
    RecipeRunner(str(path)).run(only="prep")
    assert marker.read_text() == "x"
    with pytest.raises(RecipeError, match="names no step"):
        RecipeRunner(str(path)).run(only="nope")
