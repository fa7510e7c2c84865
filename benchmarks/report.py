"""Benchmark report: run the CPU benchmarks, each writing a JSON record of its figures, and write
docs/performance.md from every record in benchmarks/results.

    python benchmarks/report.py run [--cpu] [--results benchmarks/results] [--only unet_step sampler]
    python benchmarks/report.py write [--results benchmarks/results] [--out docs/performance.md]

`run` runs each CPU benchmark alone, one subprocess after another, at the settings benchmarks/README.md quotes
for its CPU rows, with ``--json <results>``: each writes ``<results>/<name>-<machine>.json``. GPU records come
from a device run of benchmarks/gpu_check.sh (it writes them into ``$OUT/results``; copy them into the results
folder). `write` reads every ``*.json`` in the results folder and writes one section per benchmark, one table per
machine, each run's settings and date, and a summary of the headline figures first.

A record is one JSON object (a file holds one, or a list of them):

    {"benchmark": "unet_step", "variant": "tiny, fp32, batch 64", "device": "cpu",
     "machine": {"cpu": "AMD EPYC", "cores": 2, "threads": 2, "gpu": null, "torch": "2.x", "python": "3.12.3",
                 "date": "2026-11-27T10:30:00Z", "load_1m": 0.4},
     "settings": {"config": "tiny", ...},  "command": "python benchmarks/unet_step.py --config tiny ...",
     "figures": {"ours step": {"value": 181.2, "unit": "ms"}, ...},
     "source": "measured"}

A figure's value is a number, null (not measured: its "note" says why), or [low, high] (a range over runs, as
transcribed). Figure names "<row>: <metric>" (data_throughput's resolution/worker cases, train_throughput's
strategies) are shown as one table row per <row>. The records are written by report_record.py (the benchmark
scripts import `write_record` from it) and the page by report_render.py; like this module, they import only the
standard library at the top (`write` needs no torch).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report_* modules beside this script

from report_render import load_records, render

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
OUT = REPO / "docs" / "performance.md"

# `run --cpu`: the CPU rows' settings of benchmarks/README.md (each a few seconds to about a minute alone)
CPU_SUITE = (
    ("data_throughput", ["--samples", "20000", "--workers", "0", "1", "--resolution", "64", "32", "--repeats", "2"]),
    ("unet_step", ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "64", "--steps", "10"]),
    ("sampler", ["--device", "cpu", "--batch", "16", "--steps", "50"]),
    ("efficient_unet", ["--device", "cpu", "--dtype", "fp32", "--side", "64", "--batch", "16", "--channels", "32",
                        "--steps", "5"]),
    ("train_throughput", ["--config", "tiny", "--device", "cpu", "--strategy", "ddp", "--steps", "3",
                          "--warmup", "1"]),
)


def write(results: str | os.PathLike, out: str | os.PathLike) -> Path:
    records = load_records(results)
    if not records:
        raise SystemExit(f"no records in {results}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(records))
    return out


# ---- running ------------------------------------------------------------------------------------------------
def run(results: Path, only: list[str] | None, shards: str, timeout: float) -> int:
    results.mkdir(parents=True, exist_ok=True)
    failed, times, t0 = [], {}, time.perf_counter()
    for name, argv in CPU_SUITE:
        if only and name not in only:
            continue
        if name == "data_throughput":
            if not (Path(shards) / "manifest.json").is_file():
                print(f"== {name}: skipped, no shards at {shards} (`make data` writes them)", flush=True)
                failed.append(name)
                continue
            argv = ["--shards", shards, *argv]
        cmd = [sys.executable, str(HERE / f"{name}.py"), *argv, "--json", str(results)]
        print(f"== {name}: {shlex.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            code = subprocess.run(cmd, cwd=REPO, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        times[name] = time.perf_counter() - start
        print(f"== {name}: {times[name]:.0f} s" + ("" if code == 0 else f", FAILED ({code})"), flush=True)
        if code != 0:
            failed.append(name)
    total = time.perf_counter() - t0
    print(f"== total {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
    if failed:
        print(f"== failed or skipped: {', '.join(failed)}")
    print(f"== records in {results}; next: python benchmarks/report.py write --results {results}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the CPU benchmarks, one JSON record each")
    r.add_argument("--cpu", action="store_true",
                   help="the CPU suite (the default and only suite here; GPU records come from gpu_check.sh)")
    r.add_argument("--results", default=str(RESULTS))
    r.add_argument("--only", nargs="+", choices=[n for n, _ in CPU_SUITE], default=None)
    r.add_argument("--shards", default="data/shapes/train", help="data_throughput's shards (`make data`)")
    r.add_argument("--timeout", type=float, default=1200, help="seconds per benchmark")
    w = sub.add_parser("write", help="write the report from the JSON records")
    w.add_argument("--results", default=str(RESULTS))
    w.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.command == "run":
        return run(Path(args.results), args.only, args.shards, args.timeout)
    out = write(args.results, args.out)
    print(f"wrote {out} ({len(load_records(args.results))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
