"""The accuracy table the evaluation reports share: one row per set of images, each attribute's accuracy (and
all five at once) with its 95% Wilson interval, and the number of images it was measured on."""

from __future__ import annotations

from t2i.eval.shapes import ATTRIBUTES, percent_with_interval

SPLIT_NAMES = {"seen": "seen combinations", "unseen": "unseen combinations (held out of training)"}


def header() -> list[str]:
    return ["| images | n | " + " | ".join(ATTRIBUTES) + " | all five |", "|---" * (len(ATTRIBUTES) + 3) + "|"]


def row(name: str, result: dict) -> str:
    """A table row for a `t2i.eval.shapes.compare` result: accuracy [95% interval] per column."""
    cells = (percent_with_interval(result, a) for a in (*ATTRIBUTES, "all"))
    return f"| {name} | {result['n']} | " + " | ".join(cells) + " |"


def drop_confusion(results: dict) -> dict:
    """`results` without the confusion matrices (kept out of report.json), nested tables included."""
    return {k: drop_confusion(v) for k, v in results.items() if k != "confusion"} if isinstance(results, dict) \
        else results
