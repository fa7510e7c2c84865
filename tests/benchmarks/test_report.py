"""benchmarks/report.py: each benchmark's ``--json`` record from a real run at a tiny setting (in this process: one
torch import), and ``report.py write`` over a results folder (machines noted, figures present, deterministic)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from t2i_testing import REPO

BENCH = REPO / "benchmarks"
MACHINE_KEYS = {"cpu", "cores", "threads", "gpu", "torch", "python", "date", "load_1m"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    # as when a script runs as `python benchmarks/<name>.py`: its folder (so `report_record`) is importable
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """Four benchmarks run for real at tiny settings, each writing its record into one folder."""
    pytest.importorskip("diffusers")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # the scripts' `report_record`, as when each runs from benchmarks/
        from t2i_testing import make_shard_set
        root = tmp_path_factory.mktemp("bench")
        shards = make_shard_set(root / "shards", [24, 24], image_size=16).parent
        out = root / "results"
        runs = {
            "data_throughput": ["--shards", str(shards), "--samples", "32", "--batch", "8", "--workers", "0",
                                "--resolution", "16", "--repeats", "1", "--vae-batch", "2", "--vae-steps", "1"],
            "unet_step": ["--config", "tiny", "--device", "cpu", "--batch", "1", "--steps", "1"],
            "sampler": ["--device", "cpu", "--batch", "1", "--steps", "2"],
            "efficient_unet": ["--device", "cpu", "--side", "16", "--batch", "1", "--channels", "8", "--steps", "1"],
        }
        for name, argv in runs.items():
            _load(name).main([*argv, "--json", str(out)])
        return out


def _records(folder):
    return {json.loads(p.read_text())["benchmark"]: (p.name, json.loads(p.read_text()))
            for p in sorted(folder.glob("*.json"))}


def test_each_benchmark_writes_its_record(tiny_records):
    records = _records(tiny_records)
    assert set(records) == {"data_throughput", "unet_step", "sampler", "efficient_unet"}
    for bench, (name, r) in records.items():
        assert name.startswith(f"{bench}-") and name.endswith("-cores.json"), name  # <name>-<machine>.json
        assert set(r["machine"]) == MACHINE_KEYS
        assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] and r["machine"]["torch"]
        assert r["machine"]["date"].endswith("Z") and r["device"] == "cpu" and r["source"] == "measured"
        assert "json" not in r["settings"] and "--json" not in r["command"]
        assert r["command"].startswith(f"python benchmarks/{bench}.py ")
        for fig in r["figures"].values():
            assert set(fig) <= {"value", "unit", "note"} and isinstance(fig["unit"], str)
    data = records["data_throughput"][1]
    assert data["settings"]["resolution"] == [16] and data["settings"]["workers"] == [0]
    assert data["figures"]["16px, 0 workers: t2i datamodule"]["value"] > 0
    ratio = data["figures"]["16px, 0 workers: ratio"]["value"]
    ours, bare = (data["figures"][f"16px, 0 workers: {k}"]["value"] for k in ("t2i datamodule", "bare webdataset"))
    assert ratio == pytest.approx(ours / bare, rel=1e-4)
    assert data["figures"]["tiny VAE training, 32px, batch 2, fp32"]["unit"] == "images/s"
    unet = records["unet_step"][1]
    assert unet["variant"] == "tiny, fp32, batch 1" and unet["settings"]["batch"] == 1
    assert unet["figures"]["ours params"]["value"] == unet["figures"]["diffusers params"]["value"] > 0
    assert unet["figures"]["ours/diffusers"]["value"] == pytest.approx(
        unet["figures"]["ours step"]["value"] / unet["figures"]["diffusers step"]["value"], rel=1e-4)
    sampler = records["sampler"][1]["figures"]
    assert sampler["network calls"]["value"] == 2 and 0 <= sampler["sampler overhead"]["value"] < 100
    eff = records["efficient_unet"][1]["figures"]
    assert eff["efficient/plain"]["unit"] == "x" and eff["plain step"]["value"] > 0


def _write(results, out):
    report = _load("report")
    report.write(results, out)
    return out.read_text()


def test_write_tables_machines_and_order(tiny_records, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(tiny_records, results)
    shutil.copy(BENCH / "results" / "readme-transcribed-nvidia-h100-80gb.json", results)
    text = _write(results, tmp_path / "performance.md")
    cpu = _records(tiny_records)["sampler"][1]["machine"]
    cpu_label = f"{cpu['cpu']}, {cpu['cores']} cores"
    h100 = "NVIDIA H100 80GB, benchmarks/README.md (transcribed)"
    # machines noted, sections in benchmark order, one table per machine in each
    assert f"| {cpu_label} | {cpu['cpu']} | {cpu['cores']} | - | {cpu['torch']} |" in text
    assert f"| {h100} | - | - | NVIDIA H100 80GB | 2.11 |" in text
    sections = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["Machines", "Summary", "data_throughput", "unet_step", "sampler", "efficient_unet"]
    unet = text.split("## unet_step")[1].split("## sampler")[0]
    assert unet.index(f"### {cpu_label}") < unet.index(f"### {h100}")
    # figures present: a pivoted "<row>: <metric>" table, plain tables, ranges, the run's command and date
    assert "|  | t2i datamodule (samples/s) | bare webdataset (samples/s) | ratio |" in text
    assert "| figure | unit | sd15, bf16, batch 8 | sd15, bf16, batch 8, channels_last | tiny, bf16, batch 256 |" in text
    assert "| ours/diffusers | x | 0.95-0.96 | 0.85-0.96 | 0.93-0.98 |" in text
    assert f"| UNet train step, ours / diffusers | {h100} | sd15, bf16, batch 8 | 0.95-0.96 |" in text
    assert "| sampler overhead (DDIM time outside the network) | " + h100 + " | DDIM-50, batch 64 | 5.2% |" in text
    assert "`python benchmarks/sampler.py --device cpu --batch 1 --steps 2` (" + cpu["date"][:10] in text
    # deterministic: the same records under other file names (another listing order) give the same text
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, path in enumerate(sorted(results.glob("*.json"), reverse=True)):
        shutil.copy(path, shuffled / f"{i:02d}-{path.name}")
    assert _write(shuffled, tmp_path / "again.md") == text


def test_pivot_rows_nulls_notes_and_cli(tmp_path):
    rec = _load("report_record")
    machine = {"cpu": "Test CPU", "cores": 4, "threads": 4, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.0",
               "python": "3.12", "date": "2026-01-02T03:04:05Z", "load_1m": 0.5}
    figures = {"UNet params": rec.figure(859520964, "params"),
               "ddp: images/s": rec.figure(700.25, "images/s"), "ddp: MFU": rec.figure(38.04, "%"),
               "ddp: peak mem": rec.figure(41.5, "GiB"),
               "deepspeed_stage_3: images/s": rec.figure(None, "images/s", "timed out after 100 s")}
    record = {"benchmark": "train_throughput", "variant": "sd, batch 32, channels_last", "device": "cuda",
              "machine": machine, "settings": {"config": "sd"}, "figures": figures, "source": "measured"}
    (tmp_path / "train_throughput-x.json").write_text(json.dumps(record))
    out = tmp_path / "docs" / "performance.md"
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), "write", "--results", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "### NVIDIA H100 80GB HBM3 (host Test CPU, 4 cores)" in text
    assert "|  | images/s | MFU | peak mem (GiB) | note |" in text
    assert "| ddp | 700 | 38.0% | 41.50 |  |" in text
    assert "| deepspeed_stage_3 | n/a | - | - | timed out after 100 s |" in text
    assert "| LDM stage training MFU | NVIDIA H100 80GB HBM3 | sd, batch 32, channels_last, ddp | 38.0% |" in text
    assert "| UNet params | params | 859,520,964 |" in text
    assert "settings config=\"sd\" (2026-01-02 03:04:05 UTC; 4 torch threads; load 0.50; torch 2.0)" in text


def test_committed_report_matches_committed_records():
    """docs/performance.md is generated: it must be what `report.py write` makes of benchmarks/results."""
    report = _load("report")
    assert (REPO / "docs" / "performance.md").read_text() == report.render(report.load_records(BENCH / "results"))


@pytest.mark.slow
def test_train_throughput_record(tmp_path):
    """train_throughput's record from a real (tiny, CPU) training under ddp, and a skipped strategy's reason."""
    cmd = [sys.executable, str(BENCH / "train_throughput.py"), "--config", "tiny", "--device", "cpu", "--strategy",
           "ddp", "deepspeed_stage_2", "--steps", "1", "--warmup", "0", "--batch", "4", "--json", str(tmp_path / "r.json")]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["benchmark"] == "train_throughput" and r["variant"] == "tiny, batch 4" and r["device"] == "cpu"
    assert r["settings"]["strategy"] == ["ddp", "deepspeed_stage_2"]
    figs = r["figures"]
    assert figs["ddp: global batch"]["value"] == 4 and figs["ddp: images/s"]["value"] > 0
    assert figs["ddp: images/s"]["value"] == pytest.approx(4000 / figs["ddp: step"]["value"], rel=1e-3)
    assert figs["ddp: MFU"]["value"] is None and figs["ddp: precision"]["value"] == "32-true"
    assert figs["deepspeed_stage_2: images/s"]["value"] is None
    assert "needs CUDA" in figs["deepspeed_stage_2: images/s"]["note"]


def test_data_throughput_compares_the_bucketed_and_square_streams(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from t2i_testing import make_shard_set
    shards = make_shard_set(tmp_path / "shards", [20, 20], image_size=16).parent
    _load("data_throughput").main(["--shards", str(shards), "--buckets", "--samples", "16", "--batch", "4",
                                   "--resolution", "16", "--repeats", "2", "--json", str(tmp_path / "out")])
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    figures = record["figures"]
    assert record["variant"].startswith("buckets, ") and figures["16px, 0 workers: bucketed stream"]["value"] > 0
    assert figures["16px, 0 workers: square stream"]["value"] > 0
    assert figures["16px, 0 workers: time, bucketed / square"]["value"] > 0


def test_data_throughput_buckets_on_jpeg_photographs_writes_both_streams(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(BENCH))
    _load("data_throughput").main(["--buckets", "--jpeg", "24", "--samples", "8", "--batch", "4", "--resolution",
                                   "64", "--repeats", "1", "--json", str(tmp_path / "out")])
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert record["variant"] == "buckets, 24 JPEG photographs, batch 4"
    figures = record["figures"]
    assert figures["64px, 0 workers: bucketed stream"]["value"] > 0 and figures["64px, 0 workers: square stream"]["value"] > 0


def test_crop_conditioning_experiment_runs_end_to_end(small_shapes, tiny_vae_export, tmp_path, monkeypatch, capsys):
    """The experiment's plumbing (bucketed training with random crops, sampling at two crop offsets, the shift and
    its interval); its figures come from a real budget (docs/ldm.md)."""
    monkeypatch.syspath_prepend(str(BENCH))
    _load("crop_conditioning").main(["--vae", str(tiny_vae_export), "--shapes", str(small_shapes), "--run",
                                     str(tmp_path / "run"), "--steps", "2", "--prompts", "3", "--sample-steps", "2"])
    out = capsys.readouterr().out
    assert "vertical (rows; negative: up): mean shift" in out or "no shift to measure" in out
    assert "prompts where a sample showed no shape:" in out


def test_aspect_buckets_experiment_runs_end_to_end(tiny_vae_export, tmp_path, monkeypatch, capsys):
    """The experiment's plumbing (shapes on three canvases, bucketed latents, bucketed training with size
    conditioning, per-bucket judging with intervals, the picture); its figures come from a real budget."""
    monkeypatch.syspath_prepend(str(BENCH))
    picture = tmp_path / "aspect.png"
    _load("aspect_buckets").main(["--vae", str(tiny_vae_export), "--data", str(tmp_path / "data"), "--run",
                                  str(tmp_path / "run"), "--train", "64", "--batch", "4", "--steps", "2", "--prompts", "2",
                                  "--sample-steps", "2", "--picture", str(picture)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " | 2 | " in line]
    assert len(rows) == 6  # 3 buckets x (seen, unseen), 2 prompts each
    from PIL import Image
    assert Image.open(picture).size == ((48 + 64 + 32) * 4 + 16, 64 * 4)
