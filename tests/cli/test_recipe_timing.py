"""The recipe runner's timing and summary, end to end without training: the reference estimate after the plan
(also with ``--plan``), a measured estimate from each training stage that runs once it writes progress.json (a
stand-in stage process writes it), an earlier run's progress.json ignored, and the summary at the end."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace

import pytest
import yaml

from t2i.callbacks.step_timing import PROGRESS
from t2i.cli import recipe as recipe_module
from t2i.cli.recipe import RUN, TRAIN, PlannedStep, RecipeError, RecipeRunner, main
from t2i.eval import ldm_report


def write(tmp_path, steps: list[dict], machine: str | None = "2-core test box") -> str:
    path = tmp_path / "timed.yaml"
    path.write_text(yaml.safe_dump({**({"reference_machine": machine} if machine else {}), "steps": steps}))
    return str(path)


def command(name: str, seconds: float | None = None) -> dict:
    return {"name": name, "kind": "command", "run": [sys.executable, "-c", f"print('{name} ran')"],
            **({"expect": {"seconds": seconds}} if seconds else {})}


EVALUATE = {"name": "evaluate", "kind": "call", "function": "t2i.eval.ldm_report:evaluate_ldm",
            "args": {"export": "x", "out_dir": "y", "val_manifest": "z"}, "expect": {"seconds": 60}}


def stand_in_stage(tmp_path, progress: bool = True, sleep: float = 0.5, exit_code: int = 0, name: str = "vae",
                   step_seconds: float = 0.5) -> PlannedStep:
    """A training stage whose process writes, instead of training, what a real one would: progress.json at
    step 10 of 110 at `step_seconds` per step (when `progress`) and an export with val/psnr."""
    run_dir = tmp_path / "runs" / name
    script = f"""
import json, pathlib, time
run = pathlib.Path({str(run_dir)!r})
run.mkdir(parents=True, exist_ok=True)
if {progress}:
    (run / "progress.json").write_text(json.dumps(
        {{"step": 10, "max_steps": 110, "step_seconds": {step_seconds}, "measured_steps": 5, "time": time.time()}}))
(run / "export").mkdir(exist_ok=True)
(run / "export" / "stage.json").write_text(json.dumps({{"config_hash": "h", "metrics": {{"val/psnr": 30.123}}}}))
time.sleep({sleep})
raise SystemExit({exit_code})
"""
    return PlannedStep(name, "train", TRAIN, "stand-in", export=run_dir / "export", run_dir=run_dir,
                       argv=(sys.executable, "-c", script), expect={"seconds": 100, "step_seconds": 0.25},
                       summary_metrics=("val/psnr",))


@pytest.fixture
def runner_with_stage(tmp_path, monkeypatch):
    """A recipe data -> vae (the stand-in stage) -> evaluate (returns summary lines instead of evaluating)."""
    monkeypatch.setattr(recipe_module, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(ldm_report, "evaluate_ldm", lambda **kw: {"summary": ["alignment: 99%", "report: r.md"]})

    def make(**stage):
        runner = RecipeRunner(write(tmp_path, [command("data"), EVALUATE]))
        data, evaluate = runner.plan()
        steps = [data, stand_in_stage(tmp_path, **stage), evaluate]
        runner.plan = lambda only=None: steps
        return runner
    return make


def test_plan_carries_expect_and_summary_metrics_and_prints_the_reference_estimate(tmp_path, capsys):
    path = write(tmp_path, [command("data"), command("prep", 90), EVALUATE])
    planned = RecipeRunner(path).plan()
    assert [p.expect for p in planned] == [{}, {"seconds": 90}, {"seconds": 60}]
    main([path, "--plan"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0] == f"[recipe] plan of {path}:"
    assert out[4] == ("[recipe] about 2 min on the reference machine (2-core test box) for the steps that will "
                      "run (unknown: data)")


def test_a_recipe_without_reference_times_prints_no_estimate(tmp_path, capsys):
    main([write(tmp_path, [command("data")], machine=None), "--plan"])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_bad_expect_or_summary_metrics_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"step 'data': expect must map seconds to positive numbers"):
        RecipeRunner(write(tmp_path, [{**command("data"), "expect": {"step_seconds": 1}}]))
    with pytest.raises(RecipeError, match=r"step 'data': expect must map"):
        RecipeRunner(write(tmp_path, [{**command("data"), "expect": {"seconds": "soon"}}]))
    with pytest.raises(RecipeError, match=r"step 'data': summary_metrics must be a list of metric names of a "):
        RecipeRunner(write(tmp_path, [{**command("data"), "summary_metrics": ["val/psnr"]}]))


def test_the_measured_estimate_follows_the_first_training_steps_and_the_summary_ends_the_run(
        runner_with_stage, tmp_path, capfd):
    runner = runner_with_stage(sleep=1.0)
    runner.run()
    out = capfd.readouterr().out
    lines = out.splitlines()
    assert lines[4].startswith("[recipe] about 3 min on the reference machine (2-core test box) for the steps that "
                               "will run (unknown: data); a measured estimate")
    measured = [line for line in lines if line.startswith("[recipe] this machine:")]
    # 100 steps left at 0.5 s, then evaluate's 60 s at twice the reference time: 170 s (plus the few elapsed)
    assert len(measured) == 1 and measured[0].startswith(
        "[recipe] this machine: vae at 0.5 s/step (reference 0.25 s/step, ratio 2.00): the whole job about 3 min, "
        "done about ")
    stage_done = next(i for i, line in enumerate(lines) if re.fullmatch(r"\[recipe\] vae: \d+s", line))
    assert lines.index(measured[0]) < stage_done

    summary = lines[lines.index(f"[recipe] ===== summary ({runner.path}) ====="):]
    assert summary[1].split() == ["step", "action", "time"]
    assert [row.split()[:2] for row in summary[2:5]] == [["data", RUN], ["vae", TRAIN], ["evaluate", RUN]]
    assert all(row.split()[3] == "s" for row in summary[2:5])
    assert summary[3].split()[4:] == ["0.5", "s/step", "val/psnr", "30.12"]
    assert summary[5].startswith("total") and summary[5].endswith("min)")
    assert summary[6:] == ["alignment: 99%", "report: r.md"]


def test_a_stage_that_ends_before_a_poll_still_gives_the_estimate(runner_with_stage, capfd):
    runner_with_stage(sleep=0).run()
    assert capfd.readouterr().out.count("[recipe] this machine: vae at 0.5 s/step") == 1


def test_an_earlier_runs_progress_file_is_not_used(runner_with_stage, tmp_path, capfd):
    runner = runner_with_stage(progress=False)
    stale = tmp_path / "runs" / "vae" / PROGRESS
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"step": 50, "max_steps": 110, "step_seconds": 9.0, "time": 4e9}))  # even "newer"
    runner.run()
    out = capfd.readouterr().out
    assert "this machine:" not in out and "s/step" not in out and not stale.exists()


def test_a_failing_stage_still_fails_as_before(runner_with_stage, tmp_path):
    runner = runner_with_stage(exit_code=3)
    with pytest.raises(RecipeError, match=r"stage 'vae' failed \(see its output above\); rerun the recipe to resume "
                                          r"it from .*/checkpoints/last.ckpt"):
        runner.run()


def test_the_summary_of_a_skipped_stage_shows_its_export_metrics(tmp_path, capfd):
    stage = stand_in_stage(tmp_path)
    stage.export.mkdir(parents=True)
    (stage.export / "stage.json").write_text(json.dumps({"config_hash": "h", "metrics": {"val/psnr": 28.5}}))
    runner = RecipeRunner(write(tmp_path, [command("data")]))
    runner.plan = lambda only=None: [replace(stage, action="skip")]
    runner.run()
    row = capfd.readouterr().out.splitlines()[-2]
    assert row.split() == ["vae", "skip", "0", "s", "val/psnr", "28.5"]


def test_each_training_stage_re_estimates_at_its_own_speed(tmp_path, monkeypatch, capsys):
    """vae at 2x the reference's s/step, then ldm at 1x: the second estimate counts the rest at 1x."""
    monkeypatch.setattr(recipe_module, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(ldm_report, "evaluate_ldm", lambda **kw: {"summary": []})
    runner = RecipeRunner(write(tmp_path, [EVALUATE]))
    (evaluate,) = runner.plan()
    steps = [stand_in_stage(tmp_path, name="vae", step_seconds=0.5),
             stand_in_stage(tmp_path, name="ldm", step_seconds=0.25), evaluate]
    runner.plan = lambda only=None: steps
    runner.run()
    lines = [line for line in capsys.readouterr().out.splitlines() if "this machine:" in line]
    assert len(lines) == 2
    assert "vae at 0.5 s/step" in lines[0] and "ratio 2.00" in lines[0]
    assert "ldm at 0.25 s/step" in lines[1] and "ratio 1.00" in lines[1]
