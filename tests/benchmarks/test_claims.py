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
