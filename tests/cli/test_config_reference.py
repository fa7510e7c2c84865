"""docs/configuration.md is generated from configs/ and kept up to date (python tools/config_reference)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys

import pytest
from t2i_testing import REPO

from t2i.cli.config import config_dir

TOOL = REPO / "tools" / "config_reference"


def _tool():
    """The generator's command-line module and its parts, imported as `python tools/config_reference` imports
    them: with the tool's folder first on sys.path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TOOL))
        spec = importlib.util.spec_from_file_location("config_reference", TOOL / "__main__.py")
        main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(main)
        return main, importlib.import_module("config_markdown"), importlib.import_module("config_yaml")


cr, config_markdown, config_yaml = _tool()
esc, fmt_value, parse_yaml_text = config_markdown.esc, config_yaml.fmt_value, config_yaml.parse_yaml_text


@pytest.fixture(scope="module")
def generated() -> str:
    return cr.generate()


def test_committed_reference_is_up_to_date(generated):
    committed = cr.default_out().read_text()
    assert committed == generated, (
        "docs/configuration.md is stale: regenerate it with `python tools/config_reference` "
        "(make config-docs) and commit it")


def test_every_config_file_is_documented(generated):
    files = sorted(p.relative_to(config_dir()).as_posix() for p in config_dir().rglob("*.yaml"))
    assert len(files) > 40
    missing = [f for f in files if f"`configs/{f}`" not in generated]
    assert not missing


def test_comments_values_and_constructor_defaults(generated):
    # the comment written next to a key in configs/train.yaml
    assert ("| `global_batch_size` | `null` | fix the global batch: accumulation = this / "
            "(data.batch_size x devices x nodes) |") in generated
    # a comment on the lines directly above a key (experiment/tiny/imagen_base.yaml: model.sampler)
    assert "| `model.sampler` | `{steps: 25, guidance_scale: 3.0, thresholding: static}` | 100 held-out" in generated
    assert "100 held-out prompts, DDIM 25 steps, CFG 3" in generated
    # constructor arguments the YAML does not set, with their Python defaults
    assert "| `model.autoencoder.gradient_checkpointing` | `false` | `AutoencoderKL` |" in generated
    assert "| `model.text_encoder.penultimate_ln` | `true` | `OpenClipTextEncoder.from_clip_export` |" in generated
    assert "| `model.denoiser_init` | `null` | `DiffusionStage` |" in generated
    # the experiments table: model, data and run folder of each experiment
    assert ("| [`tiny/ldm`](#experimenttinyldm) | `tiny` | `ldm` | `tiny` | `shapes` | "
            "`${paths.data}/shapes/train/manifest.json` | `32` | `cpu` | `runs/tiny-ldm` |") in generated
    assert "### experiment=tiny/vae" in generated
    assert not re.search(r" at 0x[0-9a-fA-F]+", generated)  # no object addresses: deterministic


def test_check_flag(tmp_path, monkeypatch, generated, capsys):
    monkeypatch.setattr(cr, "generate", lambda root=None: generated)
    out = tmp_path / "configuration.md"
    assert cr.main(["--check", "--out", str(out)]) == 1  # missing
    assert "does not exist" in capsys.readouterr().err
    assert cr.main(["--out", str(out)]) == 0
    assert out.read_text() == generated
    assert cr.main(["--check", "--out", str(out)]) == 0
    out.write_text(generated.replace("fix the global batch", "fix the batch"))
    assert cr.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "python tools/config_reference" in err and "-| `global_batch_size`" in err


def test_runs_as_a_folder():
    # as `make config-docs` runs it: the parts import from the folder Python puts first on sys.path
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--check" in proc.stdout and "python tools/config_reference" in proc.stdout


def test_parse_yaml_text():
    text = """# @package _global_
# The description,
# on two lines.
#   python -m t2i.cli.train x=1
defaults:
  - override /data: shapes   # not a key
  - _self_

a: 1                # inline
# above b
b:
  # above c
  c: "x # y"        # after a quoted hash
  d: {k: 1}
# not above: blank line follows

e: [1, 2]
f:
  - "- item: 1"
g: 2
"""
    package, description, comments, raw = parse_yaml_text(text)
    assert package == "_global_"
    assert description == ["The description,", "on two lines.", "  python -m t2i.cli.train x=1"]
    assert comments == {("a",): "inline", ("b",): "above b", ("b", "c"): "above c after a quoted hash"}
    assert raw[("b", "c")] == '"x # y"' and raw[("b", "d")] == "{k: 1}" and raw[("g",)] == "2"
    assert ("f",) not in raw and ("defaults",) not in raw


def test_format_values():
    assert fmt_value(None) == "null" and fmt_value(True) == "true" and fmt_value(1e-6) == "1e-06"
    assert fmt_value(("SIGUSR1", "SIGUSR2")) == "[SIGUSR1, SIGUSR2]"
    assert fmt_value("") == '""' and fmt_value("true") == '"true"' and fmt_value("1") == '"1"'
    assert fmt_value("a, b") == '"a, b"' and fmt_value("${paths.data}/x") == "${paths.data}/x"
    assert esc("`a|<b>` <c> | d") == "`a\\|<b>` &lt;c> \\| d"
