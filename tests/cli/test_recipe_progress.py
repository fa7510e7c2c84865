"""The recipe runner's time and results reports as pure functions: the reference estimate, the estimate from a
training stage's measured speed, reading progress.json (an earlier run's is ignored), and the summary block."""

from __future__ import annotations

import json
import time

import pytest

from t2i.cli.recipe_progress import (
    Outcome,
    estimate_remaining,
    format_summary,
    measured_line,
    read_progress,
    reference_line,
    stage_details,
)


def test_estimate_counts_the_stage_at_its_speed_and_later_steps_scaled_by_the_ratio():
    est = estimate_remaining("vae", step=200, max_steps=1200, step_seconds=0.5, reference_step_seconds=0.25,
                             later={"latents": 30.0, "ldm": 600.0, "evaluate": None})
    assert est.ratio == pytest.approx(2.0)
    assert est.remaining == pytest.approx(1000 * 0.5 + (30 + 600) * 2.0)
    assert est.unknown == ("evaluate",)


def test_estimate_without_a_reference_counts_later_steps_at_their_reference_times():
    est = estimate_remaining("vae", 10, 20, 1.0, None, {"ldm": 100.0})
    assert est.ratio is None and est.remaining == pytest.approx(10 + 100)


def test_estimate_of_a_finished_stage_or_one_without_a_step_limit():
    assert estimate_remaining("vae", 20, 20, 1.0, 1.0, {}).remaining == 0
    est = estimate_remaining("vae", 20, -1, 1.0, 2.0, {"ldm": 100.0})
    assert est.remaining == pytest.approx(50) and est.unknown == ("vae",)


def test_measured_line():
    now = time.mktime((2026, 1, 2, 14, 0, 0, 0, 0, -1))
    est = estimate_remaining("vae", 200, 1200, 0.5, 0.25, {"ldm": 600.0, "evaluate": None})
    line = measured_line("vae", 0.5, 0.25, est, elapsed=80, now=now)
    assert line == ("[recipe] this machine: vae at 0.5 s/step (reference 0.25 s/step, ratio 2.00): the whole job "
                    "about 30 min, done about 14:28 (not counting: evaluate)")


def test_reference_line_lists_steps_without_a_reference_time():
    line = reference_line("2-core Xeon", {"data": None, "vae": 420.0, "evaluate": 60.0}, trains=True)
    assert line == ("[recipe] about 8 min on the reference machine (2-core Xeon) for the steps that will run "
                    "(unknown: data); a measured estimate for this machine follows the first training steps")
    assert reference_line(None, {"evaluate": 30.0}, trains=False) == \
        "[recipe] about 30 s on the reference machine (not named) for the steps that will run"


def test_read_progress_ignores_an_earlier_runs_file_and_a_partial_one(tmp_path):
    path = tmp_path / "progress.json"
    assert read_progress(path, 0) is None
    info = {"step": 10, "max_steps": 100, "step_seconds": 0.5, "time": 1000.0}
    path.write_text(json.dumps(info))
    assert read_progress(path, since=999.0) == info
    assert read_progress(path, since=1001.0) is None  # written before the stage was launched
    path.write_text('{"step": 10, "max_st')
    assert read_progress(path, 0) is None


def test_summary_block_lists_every_step_with_its_time_then_the_call_lines():
    outcomes = [Outcome("data", "run", 15.2), Outcome("vae", "train", 412.0, stage_details(0.31, {"val/psnr": 30.123},
                                                                                         ["val/psnr", "val/x"])),
                Outcome("ldm", "skip", 0.0), Outcome("evaluate", "run", 60.4)]
    text = format_summary("recipes/ldm.yaml", outcomes, ["report: runs/x/report.md"])
    assert text.splitlines() == [
        "[recipe] ===== summary (recipes/ldm.yaml) =====",
        "step      action      time",
        "data      run         15 s",
        "vae       train      412 s   0.31 s/step  val/psnr 30.12  val/x n/a",
        "ldm       skip         0 s",
        "evaluate  run         60 s",
        "total                488 s (8.1 min)",
        "report: runs/x/report.md"]
