"""The recipe runner: stages in order with earlier exports fed forward, up-to-date stages skipped,
a changed stage retrained alone, stage-prefixed overrides, the plan (decided before anything runs, printed
first, ``--plan`` alone) for every recipe in recipes/, and clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from t2i_testing import REPO, recipe_strategy_overrides, tiny_ldm_overrides, tiny_overrides

from t2i.cli.config import compose_config
from t2i.cli.recipe import FORCE, RETRAIN, RUN, SKIP, TRAIN, PlannedStep, RecipeError, RecipeRunner, main
from t2i.exports import STAGE

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _strip(overrides: list[str], *drop: str) -> list[str]:
    return [o for o in overrides if not o.startswith(drop)]


def write_recipe(tmp_path, shapes) -> str:
    vae = _strip(tiny_overrides(shapes, tmp_path / "vae", "trainer.max_steps=2", "final_validation=false"),
                 "experiment=")
    ldm = _strip(tiny_ldm_overrides(shapes, "X", tmp_path / "ldm", "trainer.max_steps=2", "final_validation=false"),
                 "experiment=", "model.target.export=")
    recipe = {"steps": [
        {"name": "hello", "kind": "command", "run": ["python", "-c", "print('prepared')"]},
        {"name": "vae", "kind": "train", "experiment": "tiny/vae", "overrides": vae},
        {"name": "ldm", "kind": "train", "experiment": "tiny/ldm", "parents": ["vae"],
         "overrides": [*ldm, "model.target.export=${stage:vae}"]},
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


def test_config_references_read_one_value_of_the_config_tree(tmp_path):
    """The recipes' evaluation steps take the shapes sample prompts from the file the tiny experiments use."""
    runner = RecipeRunner(write_recipe(tmp_path, tmp_path))
    args = runner._resolve_value({"sample_prompts": "${config:sample_prompts/shapes.sample_prompts}", "n": 2})
    assert args["sample_prompts"] == list(compose_config(["experiment=tiny/ldm"]).model.sample_prompts)
    assert len(args["sample_prompts"]) == 8 and args["n"] == 2
    with pytest.raises(RecipeError, match="has no 'nope'"):
        runner._resolve_value("${config:sample_prompts/shapes.nope}")
    with pytest.raises(RecipeError, match="whole value"):
        runner._resolve_value("x ${config:sample_prompts/shapes.sample_prompts}")


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


def fake_export(step: PlannedStep) -> None:
    """An export of `step` as the runner sees one: a stage.json recording the config hash it was trained from."""
    step.export.mkdir(parents=True, exist_ok=True)
    (step.export / STAGE).write_text(json.dumps({"config_hash": step.config_hash}))


def dependents(steps: list[dict], name: str) -> set[str]:
    """The stages that list `name` in ``parents:``, directly or through another stage (steps are in order)."""
    found = {name}
    for step in steps:
        if found & set(step.get("parents", [])):
            found.add(step["name"])
    return found - {name}


def test_the_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"ldm", "imagen", "unclip", "glide", "ldm_finetune"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_plans_training_skipping_retraining_and_forcing(recipe, tmp_path):
    steps = yaml.safe_load(recipe.read_text())["steps"]
    stages = [s["name"] for s in steps if s.get("kind", "train") == "train"]
    root = f"paths.root={tmp_path}"  # every run and data folder under tmp_path, none in the checkout

    def plan(*overrides: str, force: tuple[str, ...] = ()) -> dict[str, PlannedStep]:
        planned = RecipeRunner(recipe, [root, *overrides], force).plan()
        assert [p.name for p in planned] == [s["name"] for s in steps]
        assert all(p.action == RUN for p in planned if p.kind != "train")
        return {p.name: p for p in planned if p.kind == "train"}

    fresh = plan()
    assert list(fresh) == stages and stages
    assert len({p.export for p in fresh.values()}) == len(stages)  # no two stages share an export folder
    for p in fresh.values():
        assert p.action == TRAIN and p.saved_hash is None and p.argv[-1] == "ckpt_path=last", p.line()
        assert p.export.is_relative_to(tmp_path), p.export
        fake_export(p)

    again = plan()
    assert {n: p.action for n, p in again.items()} == dict.fromkeys(stages, SKIP)
    assert all(again[n].config_hash == fresh[n].config_hash for n in stages)  # the hash is stable

    first = stages[0]
    _, config = RecipeRunner(recipe, [root]).stage_config(next(s for s in steps if s["name"] == first))
    changed = plan(f"{first}.seed={config['seed'] + 1}")
    retrained = {first} | dependents(steps, first)
    for name, p in changed.items():
        if name in retrained:
            old, new = fresh[name].config_hash, p.config_hash
            assert p.action == RETRAIN and p.saved_hash == old != new, p.line()
            assert f"config changed ({old} -> {new})" in p.line()
        else:
            assert p.action == SKIP and p.config_hash == fresh[name].config_hash, p.line()

    forced = plan(force=(first,))
    assert forced[first].action == FORCE and "ckpt_path=last" not in forced[first].argv
    assert all(forced[n].action == SKIP for n in stages if n != first)


def two_stage_recipe(tmp_path, marker) -> str:
    """A command step that leaves `marker`, then two tiny VAE stages, the second listing the first as parent."""
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"steps": [
        {"name": "prep", "kind": "command",
         "run": [sys.executable, "-c", f"open({str(marker)!r}, 'w'); print('prep ran')"]},
        {"name": "a", "kind": "train", "experiment": "tiny/vae", "overrides": ["name=a"]},
        {"name": "b", "kind": "train", "experiment": "tiny/vae", "overrides": ["name=b"], "parents": ["a"]}]}))
    return str(path)


def test_run_prints_the_plan_before_running_and_skips_up_to_date_stages(tmp_path, capfd):
    marker = tmp_path / "prep-ran"
    path, overrides = two_stage_recipe(tmp_path, marker), [f"paths.root={tmp_path}"]
    for p in RecipeRunner(path, overrides).plan():
        if p.kind == "train":
            fake_export(p)
    exports = RecipeRunner(path, overrides).run()
    out = capfd.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"[recipe] plan of {path}:"
    assert lines[1].startswith("[recipe]   prep: $ ")
    assert lines[2] == f"[recipe]   a: export {exports['a']['export']} matches its config ({exports['a']['hash']}): skip"
    assert lines[3].startswith("[recipe]   b: export ") and lines[3].endswith(": skip")
    assert lines.index("prep ran") > 3  # the command's output: the whole plan first, then the steps
    assert marker.exists() and out.count("up to date, skipped") == 2 and "t2i.cli.train" not in out


def test_plan_option_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "prep-ran"
    path = two_stage_recipe(tmp_path, marker)
    main([path, "--plan", f"paths.root={tmp_path}", "b.seed=3", "--force", "a"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[recipe] plan of {path}:" and len(out) == 4
    assert out[1].startswith("[recipe]   prep: $ ") and "prep ran" in out[1]
    assert out[2].startswith("[recipe]   a: --force: train from scratch (")
    assert out[3].startswith(f"[recipe]   b: no export at {tmp_path / 'runs' / 'b' / 'export'}: train (")
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_only_needs_the_stages_before_it_up_to_date(tmp_path):
    marker = tmp_path / "prep-ran"
    path, overrides = two_stage_recipe(tmp_path, marker), [f"paths.root={tmp_path}"]
    with pytest.raises(RecipeError, match=r"stage 'a' has no up-to-date export \(no export at .*\); run it first"):
        RecipeRunner(path, overrides).plan(only="b")
    fake_export(RecipeRunner(path, overrides).plan(only="a")[0])
    assert [(p.name, p.action) for p in RecipeRunner(path, overrides).plan(only="b")] == [("a", SKIP), ("b", TRAIN)]
    with pytest.raises(RecipeError, match=r"stage 'a' has no up-to-date export \(config changed"):
        RecipeRunner(path, [*overrides, "a.seed=5"]).plan(only="b")
    assert not marker.exists()


def test_a_changed_parent_retrains_its_children_through_their_recorded_hashes(tmp_path):
    """b's overrides never mention a: only ``parents: [a]`` (a's hash in b's config) ties b to a."""
    path, overrides = two_stage_recipe(tmp_path, tmp_path / "prep-ran"), [f"paths.root={tmp_path}"]
    for p in RecipeRunner(path, overrides).plan():
        if p.kind == "train":
            fake_export(p)
    actions = {p.name: p.action for p in RecipeRunner(path, [*overrides, "a.seed=5"]).plan()}
    assert actions == {"prep": RUN, "a": RETRAIN, "b": RETRAIN}
    actions = {p.name: p.action for p in RecipeRunner(path, [*overrides, "b.seed=5"]).plan()}
    assert actions == {"prep": RUN, "a": SKIP, "b": RETRAIN}


def test_unknown_force_and_misplaced_parents_are_errors(tmp_path):
    path = two_stage_recipe(tmp_path, tmp_path / "prep-ran")
    with pytest.raises(RecipeError, match=r"--force \['nope'\] names no training stage"):
        RecipeRunner(path, force=("nope",))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"steps": [
        {"name": "b", "kind": "train", "experiment": "tiny/vae", "parents": ["a"]},
        {"name": "a", "kind": "train", "experiment": "tiny/vae"}]}))
    with pytest.raises(RecipeError, match=r"stage 'b' lists parents \['a'\] that are not training stages before it"):
        RecipeRunner(str(bad), [f"paths.root={tmp_path}"]).plan()
