"""The LDM recipe's evaluation step on the tiny export: prompts of seen and of unseen combinations at both
guidance scales, every accuracy with its 95% interval, in report.md and report.json."""

from __future__ import annotations

import json

from t2i.eval.ldm_report import evaluate_ldm, summary_lines
from t2i.eval.shapes import ATTRIBUTES, percent_with_interval


def test_the_report_gives_seen_and_unseen_accuracy_with_intervals(tiny_ldm_export, small_shapes, tmp_path):
    out = tmp_path / "eval"
    results = evaluate_ldm(str(tiny_ldm_export), str(out), str(small_shapes / "val"), num_prompts=3, steps=2,
                           batch_size=3)
    scale = results["settings"]["guidance_scale"]
    for key in (f"cfg{scale:g}_seen", f"cfg{scale:g}_unseen", "cfg1_seen", "cfg1_unseen"):
        result = results[key]
        assert result["n"] == 3 and set(result["ci95"]) == {*ATTRIBUTES, "all"}
        for a, (low, high) in result["ci95"].items():
            assert 0.0 <= low <= result[a] <= high <= 1.0
    saved = json.loads((out / "report.json").read_text())
    assert saved[f"cfg{scale:g}_unseen"]["ci95"] == results[f"cfg{scale:g}_unseen"]["ci95"]
    assert "confusion" not in saved["oracle_on_real_validation"]
    report = (out / "report.md").read_text()
    assert report.count("unseen combinations (held out of training)") == 2
    assert report.count("seen combinations") == 4 and "%  [" not in report and "% [" in report
    assert (out / "unseen_cfg1.png").is_file() and (out / "seen_cfg1.png").is_file()
    seen, unseen = (percent_with_interval(results[f"cfg{scale:g}_{split}"]) for split in ("seen", "unseen"))
    assert saved["summary"] == results["summary"] == [
        f"alignment, seen combinations: all five attributes {seen} at CFG scale {scale:g}, n=3",
        (f"alignment, unseen combinations (held out of training): all five attributes {unseen} at CFG scale "
         f"{scale:g}, n=3"),
        f"report: {out / 'report.md'}"]


def test_the_summary_names_the_samples_when_there_are_some(tmp_path):
    result = {"all": 0.5, "ci95": {"all": (0.25, 0.75)}, "n": 8}
    lines = summary_lines({"cfg3_seen": result, "cfg3_unseen": result}, tmp_path, 3.0, samples=True)
    assert lines == ["alignment, seen combinations: all five attributes 50.0% [25.0, 75.0] at CFG scale 3, n=8",
                     ("alignment, unseen combinations (held out of training): all five attributes 50.0% "
                      "[25.0, 75.0] at CFG scale 3, n=8"),
                     f"samples: {tmp_path / 'samples.png'}", f"report: {tmp_path / 'report.md'}"]
