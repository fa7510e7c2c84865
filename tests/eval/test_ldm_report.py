"""The LDM recipe's evaluation step on the tiny export: prompts of seen and of unseen combinations at both
guidance scales, every accuracy with its 95% interval, in report.md and report.json."""

from __future__ import annotations

import json

from t2i.eval.ldm_report import evaluate_ldm
from t2i.eval.shapes import ATTRIBUTES


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
