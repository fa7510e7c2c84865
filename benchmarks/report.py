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
strategies) are shown as one table row per <row>. The records are written by report_record.py (every benchmark
script imports `write_record` from it); like this module, it imports only the standard library at the top
(`write` needs no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from report_record import machine_label

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

# section order and what each benchmark measures
BENCHMARKS = {
    "data_throughput": "samples/s of the t2i datamodule against a bare `webdataset` decode loop over the same "
                       "shards (same decode work, same batch and workers), and tiny-VAE training images/s; the "
                       "bucketed stream (aspect-ratio buckets, each sample read on its own) against the square "
                       "stream over the same shards, on shapes PNGs and on real-size JPEG photographs (0 workers: "
                       "the samples/s one core decodes).",
    "unet_step": "training-step time (forward + backward + AdamW) of our UNet against diffusers' "
                 "`UNet2DConditionModel` at a matched configuration (median step, best of two alternations).",
    "sampler": "DDIM time outside the network calls (classifier-free guidance batched), and the network time of "
               "one guided step: one call of 2B against two calls of B.",
    "efficient_unet": "training-step time of the Efficient U-Net against the plain UNet at (nearly) equal "
                      "parameter count, a super-resolution configuration (low-res input concatenated).",
    "train_throughput": "a short training of the real LDM stage through `train(cfg)` under each strategy: "
                        "images/s, step time, peak GPU memory, UNet FLOPs per image and MFU.",
}

# (headline, benchmark, regex on the figure name[, "name": the run column shows the figure's name, not the
# record's variant]): the summary at the top of the report, in this order
HEADLINES = (
    ("datamodule / bare WebDataset (samples/s)", "data_throughput", r": ratio$"),
    ("tiny VAE training images/s", "data_throughput", r"^tiny VAE training", "name"),
    ("bucketed / square stream time (below 1: buckets faster)", "data_throughput", r"time, bucketed / square$"),
    ("UNet train step, ours / diffusers", "unet_step", r"^ours/diffusers$"),
    ("CFG: one call of 2B / two calls of B", "sampler", r"^CFG batched/two calls$"),
    ("sampler overhead (DDIM time outside the network)", "sampler", r"^sampler overhead$"),
    ("Efficient U-Net / plain UNet step time", "efficient_unet", r"^efficient/plain$"),
    ("LDM stage training images/s", "train_throughput", r": images/s$"),
    ("LDM stage training MFU", "train_throughput", r": MFU$"),
)


# ---- reading the records ------------------------------------------------------------------------------------
def load_records(results: str | os.PathLike) -> list[dict]:
    """Every record in ``results/*.json``, in report order (benchmark, machine, variant, date)."""
    records = []
    for path in sorted(Path(results).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e})") from e
        for record in data if isinstance(data, list) else [data]:
            missing = [k for k in ("benchmark", "machine", "settings", "figures") if k not in record]
            if missing:
                raise SystemExit(f"{path}: a record lacks {', '.join(missing)}")
            record.setdefault("variant", "")
            records.append(record)
    order = list(BENCHMARKS)

    def key(r):
        b = r["benchmark"]
        return (order.index(b) if b in order else len(order), b, machine_key(r), r["variant"],
                r["machine"].get("date") or "", json.dumps(r, sort_keys=True))
    return sorted(records, key=key)


def machine_key(record: dict) -> str:
    label = machine_label(record)
    source = record.get("source", "measured")
    return label if source == "measured" else f"{label}, {source}"


# ---- the page -----------------------------------------------------------------------------------------------
def _num(v: float, unit: str) -> str:
    if isinstance(v, bool):
        return str(v)
    if unit in ("params", "calls", "images") or (isinstance(v, int) and unit not in ("x", "%")):
        return f"{int(v):,}"
    if unit == "x":
        return f"{v:.2f}"
    if unit in ("ms", "%"):
        return f"{v:.1f}"
    if unit in ("samples/s", "images/s"):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    if unit == "GiB":
        return f"{v:.2f}"
    return f"{v:.4g}"


def fmt_value(fig: dict) -> str:
    v, unit = fig.get("value"), fig.get("unit", "")
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        text = "-".join(_num(x, unit) for x in v)
    elif isinstance(v, (int, float)):
        text = _num(v, unit)
    else:
        text = str(v)
    return f"{text}%" if unit == "%" else text


def _unit_header(metric: str, unit: str) -> str:
    return "" if unit in ("", "x", "%") or unit in metric else f" ({unit})"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _split(name: str) -> tuple[str, str] | None:
    row, sep, metric = name.partition(": ")
    return (row, metric) if sep else None


def machine_tables(records: list[dict]) -> list[str]:
    """The figures of one benchmark's records on one machine: a table of "<row>: <metric>" figures (one row per
    <row>, a variant column when there are several runs) and/or a table of plain figures (one column per run)."""
    lines: list[str] = []
    several = len(records) > 1
    # pivoted figures
    metrics: dict[str, str] = {}
    rows: list[tuple[str, str, dict]] = []
    for r in records:
        by_row: dict[str, dict] = {}
        for name, fig in r["figures"].items():
            split = _split(name)
            if split:
                by_row.setdefault(split[0], {})[split[1]] = fig
                metrics.setdefault(split[1], fig.get("unit", ""))
        rows += [(r["variant"], row, figs) for row, figs in by_row.items()]
    if rows:
        notes = any(f.get("note") for _, _, figs in rows for f in figs.values())
        header = (["run"] if several else []) + [""] + [m + _unit_header(m, u) for m, u in metrics.items()]
        header += ["note"] if notes else []
        body = []
        for variant, row, figs in rows:
            cells = ([variant] if several else []) + [row]
            cells += [fmt_value(figs[m]) if m in figs else "-" for m in metrics]
            if notes:
                cells.append("; ".join(dict.fromkeys(f["note"] for f in figs.values() if f.get("note"))))
            body.append(cells)
        lines += table(header, body) + [""]
    # plain figures
    names: dict[str, str] = {}
    for r in records:
        for name, fig in r["figures"].items():
            if not _split(name):
                names.setdefault(name, fig.get("unit", ""))
    if names:
        header = ["figure", "unit"] + ([r["variant"] or "value" for r in records] if several else ["value"])
        body = []
        for name, unit in names.items():
            cells = [name, unit]
            for r in records:
                fig = r["figures"].get(name)
                cells.append(fmt_value(fig) if fig else "-")
            body.append(cells)
        lines += table(header, body) + [""]
        plain_notes = [f"{name}: {r['figures'][name]['note']}" for r in records for name in names
                       if name in r["figures"] and r["figures"][name].get("note")]
        lines += [f"- {n}" for n in dict.fromkeys(plain_notes)] + ([""] if plain_notes else [])
    return lines


def _date(record: dict) -> str:
    d = record["machine"].get("date") or "date unknown"
    return d.replace("T", " ").replace("Z", " UTC")


def run_lines(records: list[dict]) -> list[str]:
    """One line per run: its variant, date, load, threads, command (or settings) and notes."""
    lines = []
    for r in records:
        m = r["machine"]
        bits = [_date(r)]
        if m.get("threads"):
            bits.append(f"{m['threads']} torch thread{'s' if m['threads'] != 1 else ''}")
        if m.get("load_1m") is not None:
            bits.append(f"load {m['load_1m']:.2f}")
        if m.get("torch"):
            bits.append(f"torch {m['torch']}")
        how = f"`{r['command']}`" if r.get("command") else "settings " + ", ".join(
            f"{k}={json.dumps(v)}" for k, v in r["settings"].items())
        variant = f"**{r['variant']}**: " if r["variant"] else ""
        lines.append(f"- {variant}{how} ({'; '.join(bits)})")
    notes = list(dict.fromkeys(r["note"] for r in records if r.get("note")))
    return lines + ([""] + notes if notes else [])


def machine_heading(records: list[dict]) -> str:
    r = records[0]
    m = r["machine"]
    label = machine_key(r)
    host = []
    if r.get("device", "cpu").startswith("cuda") and m.get("cpu"):
        host.append(f"host {m['cpu']}, {m.get('cores')} cores")
    return f"### {label}" + (f" ({'; '.join(host)})" if host else "")


def headline_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for title, bench, pattern, *how in HEADLINES:
        for r in records:
            if r["benchmark"] != bench:
                continue
            for name, fig in r["figures"].items():
                if re.search(pattern, name):
                    split = _split(name)
                    case = ", ".join(x for x in (r["variant"], split[0] if split else "") if x)
                    case = name if how == ["name"] else case
                    rows.append([title, machine_key(r), case, fmt_value(fig)])
    return rows


def render(records: list[dict]) -> str:
    machines: dict[str, dict] = {}
    for r in records:
        machines.setdefault(machine_key(r), r)
    lines = [
        "# Performance",
        "",
        ("Generated by `python benchmarks/report.py write` from the JSON records in `benchmarks/results/` (do not "
        "edit by hand). CPU records: `python benchmarks/report.py run --cpu`; GPU records: `bash "
        "benchmarks/gpu_check.sh` on a device machine, its `$OUT/results/*.json` copied into `benchmarks/results/`. "
        "What each benchmark measures and how: [benchmarks/README.md](../benchmarks/README.md). Each benchmark "
        "compares against its peer in the same process, so ratios are the figures to compare across machines; "
        "absolute times on a shared CPU move with its load (noted per run)."),
        "",
        "## Machines",
        "",
    ]
    body = []
    for key, r in machines.items():
        m = r["machine"]
        dates = sorted({(x["machine"].get("date") or "?")[:10] for x in records if machine_key(x) == key})
        body.append([key, m.get("cpu") or "-", str(m.get("cores") or "-"), m.get("gpu") or "-", m.get("torch") or "-",
                     ", ".join(dates), r.get("source", "measured")])
    lines += table(["machine", "CPU", "cores", "GPU", "torch", "date", "source"], body) + [""]
    lines += ["## Summary", ""]
    rows = headline_rows(records)
    lines += (table(["figure", "machine", "run", "value"], rows) if rows else ["No headline figures."]) + [""]
    for bench in dict.fromkeys(r["benchmark"] for r in records):
        group = [r for r in records if r["benchmark"] == bench]
        lines += [f"## {bench}", "", f"`benchmarks/{bench}.py`: {BENCHMARKS.get(bench, '')}".rstrip(": "), ""]
        for key in dict.fromkeys(machine_key(r) for r in group):
            runs = [r for r in group if machine_key(r) == key]
            lines += [machine_heading(runs), ""]
            lines += machine_tables(runs)
            lines += run_lines(runs) + [""]
    return "\n".join(lines).rstrip() + "\n"


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
